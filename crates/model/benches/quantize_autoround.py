"""auto-round's round-to-nearest, as benches/quantize.rs measures it, through either path.

    python quantize_autoround.py SOURCE OUT BITS GROUP_SIZE sym|asym [model-free|model]

`model-free` (the default) quantizes the model folder SOURCE into OUT with auto-round's
`ModelFreeCompressor` (iters 0, optimized RTN off, on CPU without torch.compile): the path
memwise reproduces bit for bit (see crates/model/src/quant/mod.rs). It starts worker
processes, hence the `__main__` guard.

`model` loads SOURCE with transformers and runs `AutoRound(...).quantize_and_save` with the
same settings (iters 0, `disable_opt_rtn=True`, `device_map="cpu"`, format `auto_round`).
auto-round wants a tokenizer object even for round-to-nearest; a one-word tokenizer
stands in, as no text is read.

Measured with auto-round 0.16.1, torch 2.15.0 and transformers 5.25.0
(tests/fixtures/quant/versions.json).
"""

import sys


def model_free(source, out, bits, group_size, sym):
    from auto_round.compressors.model_free import ModelFreeCompressor
    from auto_round.schemes import QuantizationScheme

    scheme = QuantizationScheme(bits=bits, group_size=group_size, sym=sym, data_type="int")
    ModelFreeCompressor(
        source,
        out,
        scheme=scheme,
        device="cpu",
        enable_torch_compile=False,
        disable_opt_rtn=True,
    ).run()


def model_path(source, out, bits, group_size, sym):
    from auto_round import AutoRound
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    model = AutoModelForCausalLM.from_pretrained(source)
    AutoRound(
        model,
        tokenizer,
        bits=bits,
        group_size=group_size,
        sym=sym,
        iters=0,
        disable_opt_rtn=True,
        device_map="cpu",
        enable_torch_compile=False,
    ).quantize_and_save(out, format="auto_round")


def main():
    source, out, bits, group_size, sym = sys.argv[1:6]
    path = sys.argv[6] if len(sys.argv) > 6 else "model-free"
    run = {"model-free": model_free, "model": model_path}[path]
    run(source, out, int(bits), int(group_size), sym == "sym")


if __name__ == "__main__":
    main()
