"""Video frame sampling, by the rule of the code generation the checkpoint was trained with (ref. §6.1).

- V15 (VILA1.5, `opencv_extract_frames` / `get_frame_from_vcap`): indices
  `np.linspace(0, frame_count - 1, N, dtype=int)` (truncation), frames read SEQUENTIALLY with
  `read()` and kept when their running index is listed; fewer frames than N -> every frame.
- NVILA (HEAD `llava/utils/media.py::_load_video`): the true last frame is found by seeking backwards
  until `grab()` succeeds; indices `round(linspace(0, last, N))`, or with `config.video_fps > 0`
  `timestamps = arange(0, duration, 1/fps)[:N]`, `index = int(t * video_fps)`; random-access reads,
  duplicate indices reuse the decoded frame. A folder of frame images is accepted too (sorted names,
  rounded linspace).
Frames are converted BGR -> RGB PIL images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vila_edge.errors import MediaError
from vila_edge.media.image import bgr_to_pil, load_image


def v15_indices(frame_count: int, num_frames: int) -> list[int]:
    if frame_count < num_frames:
        return list(range(frame_count))
    return [int(i) for i in np.linspace(0, frame_count - 1, num_frames, dtype=int)]


def nvila_indices(frame_count: int, num_frames: int, *, fps: float = 0.0, video_fps: float = 0.0) -> list[int]:
    if fps > 0 and video_fps > 0:
        duration = frame_count / video_fps
        times = np.arange(0, duration, 1.0 / fps)[:num_frames]
        return [min(int(t * video_fps), frame_count - 1) for t in times]
    return [int(i) for i in np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int)]


def open_video(path: Path):
    import cv2

    if not path.exists():
        raise MediaError(f"{path}: video file not found")
    from vila_edge.media.camera import quiet_opencv, silenced_stderr

    quiet_opencv()
    with silenced_stderr():
        cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise MediaError(f"{path}: cannot open video (not a video file, or no decoder for it); use MP4/AVI/MKV")
    return cap


def read_frames_v15(path, num_frames: int) -> list:
    import cv2

    path = Path(path)
    cap = open_video(path)
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        wanted = v15_indices(count, num_frames) if count > 0 else None
        keep = set(wanted) if wanted is not None else None
        frames = []
        idx = 0
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            if keep is None or idx in keep:
                frames.append(bgr_to_pil(frame, f"{path} frame {idx}"))
                if keep is not None and len(frames) >= len(wanted):
                    break
            idx += 1
        if keep is None and len(frames) > num_frames:  # unknown frame count: sample what was read
            frames = [frames[i] for i in v15_indices(len(frames), num_frames)]
    finally:
        cap.release()
    if not frames:
        raise MediaError(f"{path}: no frame could be decoded")
    return frames


def read_frames_nvila(path, num_frames: int, *, fps: float = 0.0) -> list:
    import cv2

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        if not files:
            raise MediaError(f"{path}: folder holds no frame images")
        idx = np.round(np.linspace(0, len(files) - 1, num_frames)).astype(int)
        return [load_image(files[i]) for i in idx]
    cap = open_video(path)
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        while count > 0:  # the container's count may overshoot: find the last frame that exists
            cap.set(cv2.CAP_PROP_POS_FRAMES, count - 1)
            if cap.grab():
                break
            count -= 1
        if count <= 0:
            raise MediaError(f"{path}: the video has no frames")
        video_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        indices = nvila_indices(count, num_frames, fps=fps, video_fps=video_fps)
        decoded: dict[int, object] = {}
        for i in indices:
            if i in decoded:
                continue
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, frame = cap.read()
            if ok and frame is not None:
                decoded[i] = bgr_to_pil(frame, f"{path} frame {i}")
    finally:
        cap.release()
    frames = [decoded[i] for i in indices if i in decoded]
    if not frames:
        raise MediaError(f"{path}: no frame could be decoded")
    return frames


def load_video(path, cfg, *, num_frames: int | None = None) -> list:
    """Frames (RGB PIL) of a video for checkpoint config `cfg` (VilaConfig)."""
    n = num_frames or cfg.num_video_frames
    if cfg.generation == "v15":
        return read_frames_v15(path, n)
    return read_frames_nvila(path, n, fps=cfg.video_fps)


def iter_frames(path, *, every: int = 1):
    """Every `every`-th frame of a video file, in order, decoded sequentially (`vila-edge watch` on a file):
    (frame index, its time in seconds from the file's frame rate, BGR uint8 image)."""
    import cv2

    if every < 1:
        raise MediaError(f"--every {every}: must be at least 1")
    path = Path(path)
    cap = open_video(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            if index % every == 0:
                t = index / fps if fps > 0 else float(cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0) / 1e3
                yield index, t, frame
            index += 1
    finally:
        cap.release()
