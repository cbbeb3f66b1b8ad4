"""circuitq: Task-Circuit Quantization (TaCQ, arXiv 2504.07389) and tools around it.

Stages, one module each: ``data`` → ``calib`` (calibration windows) → ``quantizer`` / ``gptq``
(pure cores) → ``plan`` (bits per module, bit accounting) → ``masks`` → ``quantize`` (whole-model
driver) → ``export`` (HF directory, packed GPTQ v1 + 16-bit sidecar, loader). ``cli`` is the thin
entry point. Importing circuitq changes no global state.
"""
__version__ = "0.1.0"
