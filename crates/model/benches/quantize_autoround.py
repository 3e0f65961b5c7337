"""auto-round's round-to-nearest, model-free path, as benches/quantize.rs measures it.

    python quantize_autoround.py SOURCE OUT BITS GROUP_SIZE sym|asym

Quantizes the model folder SOURCE into OUT with auto-round's `ModelFreeCompressor`
(iters 0, optimized RTN off, on CPU without torch.compile): the path memwise reproduces
bit for bit (see crates/model/src/quant/mod.rs). Measured with auto-round 0.16.1 and
torch 2.15.0 (tests/fixtures/quant/versions.json). The model-free path starts worker
processes, hence the `__main__` guard.
"""

import sys


def main():
    source, out, bits, group_size, sym = sys.argv[1:6]
    from auto_round.compressors.model_free import ModelFreeCompressor
    from auto_round.schemes import QuantizationScheme

    scheme = QuantizationScheme(bits=int(bits), group_size=int(group_size), sym=sym == "sym", data_type="int")
    ModelFreeCompressor(
        source,
        out,
        scheme=scheme,
        device="cpu",
        enable_torch_compile=False,
        disable_opt_rtn=True,
    ).run()


if __name__ == "__main__":
    main()
