"""PS3 (VILA-HD) vision on ONNX Runtime: one image in, one media item out (`vila_edge.ps3.Ps3Runner`).

PS3 has no tiles-in / features-out split like SigLIP (its token count depends on the selection), so
`encode` / `project` are refused and the runtime asks for `item(pixels)` instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vila_edge.backends.base import VisionEngine
from vila_edge.errors import EngineError


class Ps3VisionEngine(VisionEngine):
    name = "onnxruntime"

    def __init__(self, vision_dir, info: dict, config, *, device: str = "cpu", threads: int | None = None):
        from vila_edge.backends.ort_llm import ort_providers, session_options
        from vila_edge.ps3 import Ps3Runner

        self.providers = ort_providers(device)
        self.runner = Ps3Runner(Path(vision_dir), info, config.vision.ps3, config.projector.downsample,
                                self.providers, session_options(threads))

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        raise EngineError("PS3 encodes whole images (Ps3VisionEngine.item), not tiles")

    def project(self, features: np.ndarray) -> np.ndarray:
        raise EngineError("PS3 projects inside Ps3VisionEngine.item")

    def item(self, pixels: np.ndarray, prompt: np.ndarray | None = None) -> np.ndarray:
        """[1,3,S,S] -> [tokens, D]; `prompt` [C]: top-down selection, None: bottom-up."""
        if prompt is None and self.runner.s.look_close_mode == "after_prompt":
            raise EngineError("look_close_mode=after_prompt (top-down PS3 selection) needs the LLM's hidden state at "
                              "the end of the prompt, which this runtime does not compute yet; set \"look_close_mode\": "
                              "\"after_image\" in the checkpoint's config.json and rebuild to select bottom-up")
        return self.runner.item(pixels, prompt)

    def describe(self) -> dict:
        return {"backend": self.name, "tower": "ps3", "providers": self.providers,
                "graphs": sorted(self.runner.sessions), "steps": self.runner.s.look_close_steps()[0]}
