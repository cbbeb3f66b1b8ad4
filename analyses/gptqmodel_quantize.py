"""Run gptqmodel (the peer) on the same model and calibration tokens; runs in its own venv.

    .venv-gptqmodel/bin/python analyses/gptqmodel_quantize.py MODEL_DIR CALIB.pt BITS GROUP_SIZE OUT_DIR

Not imported by anything: analyses/bench_quantize.py calls it as a subprocess and times it.
Prints one JSON line {"seconds": quantize time, "peak_rss_mb": ...} at the end.
"""
import json
import os
import resource
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402


def main() -> None:
    model_dir, calib_path, bits, group_size, out = sys.argv[1:6]
    ids = torch.load(calib_path, weights_only=True)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    cfg = QuantizeConfig(bits=int(bits), group_size=int(group_size), desc_act=False, sym=False,
                         damp_percent=0.01, act_group_aware=False)
    model = GPTQModel.load(model_dir, cfg, device="cpu")
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=8)
    seconds = time.perf_counter() - t0
    model.save(out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
