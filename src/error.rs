//! One error type for the whole engine. Every variant names the file (and, where there is one, the
//! tensor) and says what is wrong, so a user can fix the input without reading the source.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong, by what the user has to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or a write.
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file whose header, offsets or size are invalid (truncated, corrupt, not safetensors).
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    /// A JSON file (config.json, adapter_config.json, index, layer map) that cannot be used.
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },

    /// A tensor the transfer needs is not in the checkpoint or adapter.
    #[error("{path}: tensor `{tensor}` is missing{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },

    /// A tensor exists but has the wrong shape, dtype or contents.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// The model's architecture has no table.
    #[error("{path}: unknown architecture `{model_type}` (supported: {supported})")]
    UnknownArchitecture {
        path: PathBuf,
        model_type: String,
        supported: String,
    },

    /// The adapter uses a PEFT feature this engine cannot transfer.
    #[error("{path}: unsupported adapter: {reason}")]
    UnsupportedAdapter { path: PathBuf, reason: String },

    /// A command-line value that cannot be used.
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument { name: &'static str, reason: String },

    /// Options that do not parse (an unknown flag, a value of the wrong kind): clap's message.
    #[error("{0}")]
    Flags(String),

    /// The output directory exists and `--force` was not given.
    #[error("{path}: output already exists; pass --force to replace it")]
    OutputExists { path: PathBuf },

    /// A numerical step failed (should not happen on finite input; reported rather than panicking).
    #[error("{context}: numerical failure: {reason}")]
    Numerical { context: String, reason: String },

    /// A backend that cannot run here (no GPU, no driver, a build without kernels).
    #[error("backend unavailable: {0}")]
    Unavailable(String),

    /// The device or its driver failed at run time (out of memory, a failed launch or copy).
    #[error("device error: {0}")]
    Device(String),

    /// The caller stopped the job (a progress callback raised, or Ctrl-C in Python); nothing
    /// was written.
    #[error("cancelled: no output written")]
    Cancelled,

    /// A broken internal invariant (a programming error, not bad input): please report it.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The variant as a stable snake_case word (the `kind` of the Python module's exceptions).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Safetensors { .. } => "safetensors",
            Error::Config { .. } => "config",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::BadTensor { .. } => "bad_tensor",
            Error::UnknownArchitecture { .. } => "unknown_architecture",
            Error::UnsupportedAdapter { .. } => "unsupported_adapter",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::Flags(_) => "flags",
            Error::OutputExists { .. } => "output_exists",
            Error::Numerical { .. } => "numerical",
            Error::Unavailable(_) => "unavailable",
            Error::Device(_) => "device",
            Error::Cancelled => "cancelled",
            Error::Internal(_) => "internal",
        }
    }

    /// Shorthand for an I/O error on a path.
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }

    /// Shorthand for a JSON/config error on a path.
    pub fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for a bad tensor.
    pub fn bad_tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::BadTensor {
            path: path.into(),
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for an internal error (a broken invariant).
    pub fn internal(what: impl Into<String>) -> Self {
        Error::Internal(what.into())
    }

    /// Shorthand for an invalid command-line value.
    pub fn arg(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }
}
