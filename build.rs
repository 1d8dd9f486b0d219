//! Compiles every `kernels/*.cu` into a fatbin (sm_90 SASS + compute_90 PTX) and embeds them.
//! nvcc comes from `NVCC`, then `CUDA_HOME`/`CUDA_PATH`, then `PATH`. Without nvcc the crate still
//! builds (no `loraxfer_cuda_kernels` cfg) and the CPU backend does everything; a kernel that
//! fails to compile fails the build.
//!
//! The same kernel sources are also compiled for the CPU emulator (kernels/emulate/, cfg
//! `loraxfer_kernel_emulator`) with the system C++ compiler, so the kernels' logic is tested
//! against the CPU reference on machines without a GPU. Without a C++20 compiler the emulator is
//! left out with a warning and the tests that need it say they are skipped (cfg
//! `loraxfer_kernel_emulator` unset: they are reported as ignored).
//!
//! kernels/api.h is parsed into the host's launch signatures (`kernel_signatures.rs`, included
//! by src/backend/cuda/kernels.rs): every kernel's name and parameters, so a launch with a wrong
//! name, count or kind of argument is refused before it reaches the driver or the emulator.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(loraxfer_cuda_kernels)");
    println!("cargo::rustc-check-cfg=cfg(loraxfer_kernel_emulator)");
    println!("cargo::rustc-check-cfg=cfg(loraxfer_emulator_fma)");
    println!("cargo::rerun-if-env-changed=LORAXFER_NO_EMULATOR");
    println!("cargo::rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    arch_tables(&out_dir);
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    for s in &sources {
        println!("cargo::rerun-if-changed={}", s.display());
    }

    let mut entries = Vec::new();
    let mut version = String::new();
    match find_nvcc() {
        Some(nvcc) => {
            version = nvcc_version(&nvcc);
            for src in &sources {
                let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                let fatbin = out_dir.join(format!("{stem}.fatbin"));
                compile(&nvcc, src, &fatbin);
                entries.push((stem, fatbin));
            }
            println!("cargo::rustc-cfg=loraxfer_cuda_kernels");
        }
        None => println!(
            "cargo::warning=nvcc not found (set NVCC, or run scripts/setup-cuda.sh): building without CUDA kernels; the CPU backend is complete"
        ),
    }

    let api = std::fs::read_to_string("kernels/api.h").expect("read kernels/api.h");
    std::fs::write(out_dir.join("kernel_signatures.rs"), signatures_rs(&api))
        .expect("write kernel_signatures.rs");

    if std::env::var_os("LORAXFER_NO_EMULATOR").is_none() {
        build_emulator(&sources);
    }

    let mut code = String::from("/// Embedded kernel images: (file stem, fatbin bytes).\npub const FATBINS: &[(&str, &[u8])] = &[\n");
    for (stem, path) in &entries {
        code += &format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        );
    }
    code += "];\n";
    code += &format!("/// The nvcc that compiled them (empty without kernels).\npub const NVCC_VERSION: &str = {version:?};\n");
    code += "/// The GPU code each fatbin holds.\npub const TARGETS: &str = \"sm_90 SASS + compute_90 PTX\";\n";
    std::fs::write(out_dir.join("kernels.rs"), code).expect("write kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVCC") {
        if !p.is_empty() {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Some(p);
            }
            panic!("NVCC={} does not exist", p.display());
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

fn nvcc_version(nvcc: &Path) -> String {
    Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| l.contains("release"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn compile(nvcc: &Path, src: &Path, fatbin: &Path) {
    let out = Command::new(nvcc)
        .args(["-fatbin", "-O3", "-std=c++17"])
        .args([
            "-gencode",
            "arch=compute_90,code=sm_90",
            "-gencode",
            "arch=compute_90,code=compute_90",
        ])
        .arg("-Ikernels")
        .arg("-o")
        .arg(fatbin)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    if !out.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Compiles the kernels and kernels/emulate/launch.cpp as C++ for the CPU emulator.
fn build_emulator(sources: &[PathBuf]) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .define("LORAXFER_EMULATE", None)
        .include("kernels")
        .flag_if_supported("-pthread")
        .flag_if_supported("-Wno-unused-parameter")
        .cargo_warnings(false);
    // Fused multiply-adds as instructions. Without them `fmaf` is a library call, one per
    // multiply-add of every emulated thread (the tensor-core emulation is nothing else), and the
    // emulator runs ~90x slower. Only where the build machine has FMA (x86_64 since 2013), which
    // the host side checks again at run time (`emulator::check_cpu`); fmaf is an instruction
    // on aarch64 anyway.
    if emulator_fma() {
        build.flag("-mfma");
        println!("cargo::rustc-cfg=loraxfer_emulator_fma");
    }
    // Probe first: a missing or too old C++ compiler leaves the emulator out, not the build.
    let probe = build
        .clone()
        .cargo_metadata(false)
        .file("kernels/emulate/launch.cpp")
        .try_compile("loraxfer_emulate_probe");
    if let Err(e) = probe {
        println!("cargo::warning=no C++20 compiler for the kernel emulator ({e}); GPU-kernel tests will be skipped on this machine");
        return;
    }
    // `.cu` is not a C++ extension to g++/clang: say the language before each file.
    build.flag("-x").flag("c++");
    for src in sources {
        build.file(src);
    }
    build.file("kernels/emulate/launch.cpp");
    build.compile("loraxfer_emulate");
    println!("cargo::rustc-cfg=loraxfer_kernel_emulator");
}

/// Whether the emulator is built with FMA instructions: building for x86_64 on a machine that
/// has them (the emulator runs where it was built: tests, `--device emulator`).
fn emulator_fma() -> bool {
    let target = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if target != "x86_64" || std::env::var("HOST") != std::env::var("TARGET") {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Writes `OUT_DIR/arch_tables.rs`: every `src/arch/tables/*.json`, by file stem, embedded with
/// `include_str!`, so that adding an architecture is adding a JSON file.
fn arch_tables(out_dir: &std::path::Path) {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("src/arch/tables");
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut tables: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    tables.sort();
    let mut code = String::from("/// Every architecture table: (file stem, JSON text).\npub const TABLES: &[(&str, &str)] = &[\n");
    for t in &tables {
        println!("cargo::rerun-if-changed={}", t.display());
        let stem = t.file_stem().unwrap().to_string_lossy();
        code += &format!(
            "    ({stem:?}, include_str!({:?})),\n",
            t.display().to_string()
        );
    }
    code += "];\n";
    std::fs::write(out_dir.join("arch_tables.rs"), code).expect("cannot write arch_tables.rs");
}

/// One kernel of `LX_KERNELS`: its name and its parameters as (name, C type).
struct KernelDecl {
    name: String,
    params: Vec<(String, String)>,
}

/// The `LX_KERNELS(X)` list of kernels/api.h, entry by entry. Panics (failing the build) on
/// anything it cannot read, so the list and the host's signatures never drift apart silently.
fn parse_kernel_list(api: &str) -> Vec<KernelDecl> {
    let start = api
        .find("#define LX_KERNELS(X)")
        .expect("kernels/api.h has no #define LX_KERNELS(X)");
    // The macro body: continuation lines up to the first line without a trailing backslash.
    let mut body = String::new();
    for line in api[start..].lines().skip(1) {
        let line = line.trim_end();
        match line.strip_suffix('\\') {
            Some(l) => body += l,
            None => {
                body += line;
                break;
            }
        }
        body.push(' ');
    }
    let mut kernels = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let entry = rest
            .strip_prefix("X(")
            .unwrap_or_else(|| panic!("kernels/api.h: expected X(name, (params)) at {rest:?}"));
        let comma = entry
            .find(',')
            .expect("kernels/api.h: X(name, ...) without a comma");
        let name = entry[..comma].trim().to_string();
        let after = entry[comma + 1..].trim_start();
        let inner = after
            .strip_prefix('(')
            .unwrap_or_else(|| panic!("kernels/api.h: {name}: parameters must be in parentheses"));
        let close = inner
            .find(')')
            .unwrap_or_else(|| panic!("kernels/api.h: {name}: unclosed parameter list"));
        let params = inner[..close]
            .split(',')
            .map(|p| split_param(&name, p.trim()))
            .collect();
        let tail = inner[close + 1..].trim_start();
        rest = tail
            .strip_prefix(')')
            .unwrap_or_else(|| panic!("kernels/api.h: {name}: expected `)` closing X(...)"))
            .trim_start();
        kernels.push(KernelDecl { name, params });
    }
    assert!(
        !kernels.is_empty(),
        "kernels/api.h: LX_KERNELS lists no kernel"
    );
    kernels
}

/// "const float* Y" -> ("Y", "const float*"); a parameter must be named.
fn split_param(kernel: &str, param: &str) -> (String, String) {
    let cut = param
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    let (ty, name) = (param[..cut].trim(), &param[cut..]);
    if ty.is_empty() || name.is_empty() {
        panic!("kernels/api.h: {kernel}: parameter {param:?} needs a type and a name");
    }
    (name.to_string(), ty.to_string())
}

/// The launch argument kind (`ArgKind` in src/backend/cuda/kernels.rs) of a C parameter type.
fn arg_kind(kernel: &str, c_type: &str) -> &'static str {
    if c_type.ends_with('*') {
        return "Ptr";
    }
    match c_type
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .as_str()
    {
        "int" => "I32",
        "long long" => "I64",
        "unsigned long long" => "U64",
        "double" => "F64",
        other => panic!(
            "kernels/api.h: {kernel}: no launch argument kind for C type `{other}` (add one to \
             ArgKind in src/backend/cuda/kernels.rs and to build.rs)"
        ),
    }
}

/// The value of `#define NAME <integer>` in `src`.
fn define_value(src: &str, name: &str) -> usize {
    let key = format!("#define {name} ");
    let line = src
        .lines()
        .find_map(|l| l.trim().strip_prefix(&key))
        .unwrap_or_else(|| panic!("kernels/api.h has no {key}"));
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("kernels/api.h: {name} is not an integer: {line:?}"))
}

/// kernel_signatures.rs: the kernels' signatures and the constants the host shares with them.
fn signatures_rs(api: &str) -> String {
    let mut code = String::from(
        "// Generated by build.rs from kernels/api.h.\n\
         /// Every kernel's launch signature, in the order of `LX_KERNELS`.\n\
         pub const SIGNATURES: &[Signature] = &[\n",
    );
    for k in parse_kernel_list(api) {
        code += &format!(
            "    Signature {{\n        name: {:?},\n        params: &[\n",
            k.name
        );
        for (name, ty) in &k.params {
            code += &format!(
                "            Param {{ name: {name:?}, c_type: {ty:?}, kind: ArgKind::{} }},\n",
                arg_kind(&k.name, ty)
            );
        }
        code += "        ],\n    },\n";
    }
    code += "];\n";
    code += &format!(
        "/// `LX_MAX_SKETCH`: the largest sketch width the orthonormalization and eigen kernels take.\n\
         pub const MAX_SKETCH: usize = {};\n",
        define_value(api, "LX_MAX_SKETCH")
    );
    code
}
