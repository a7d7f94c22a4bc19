"""Builders: checkpoint -> engine directory (`vila-edge build`).

- `build`       orchestration: stages, atomic temp dir + rename, lock, manifest, dry-run plan
- `vision_onnx` SigLIP tower (truncated at the selected layer) and projector -> ONNX, fp16, int8
- `tensorrt`    TensorRT engines from those ONNX files (optimization profiles over the tile batch)
- `engine_dir`  the manifest writer, the build lock, atomic staging (the contract and its reader: `vila_edge.engine_dir`)
- `llm_onnx`, `trtllm`, `awq`: the language model

Nothing here is imported eagerly: `--stage engines` on a Jetson must work without torch.
"""
