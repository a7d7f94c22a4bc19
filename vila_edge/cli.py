"""`vila-edge` command line: a thin layer over the Python API.

Every user-facing problem is a VilaEdgeError: printed as one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from vila_edge.errors import VilaEdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run VILA / NVILA vision-language models on Jetson Orin and laptops.")


def _checkpoint(arg):
    """The one place a checkpoint argument is resolved: a folder, or a hub id `org/name[@revision]`
    (downloaded into the huggingface_hub cache; a known id also brings its table overrides)."""
    from vila_edge.hub import resolve_checkpoint

    return resolve_checkpoint(arg)


VISION_CACHE_HELP = ("MiB of encoder outputs kept (an image seen again, e.g. resent with every turn of a "
                     "conversation, is not re-encoded); 0 turns the cache off. Default 256.")
CHECKPOINT_HELP = "Checkpoint folder (dev layout or flat -hf), or a hub id org/name[@revision] (see `vila-edge models`)."


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in size.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
        return w, h
    except ValueError:
        raise VilaEdgeError(f"--image-size {size!r}: expected WIDTHxHEIGHT, e.g. 1920x1080") from None


@app.command()
def info(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    image_size: str = typer.Option("1920x1080", help="Image size for the token count, WIDTHxHEIGHT."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    token_order: str | None = typer.Option(None, help="Override the mlp_downsample token order: row | col."),
    splice: str | None = typer.Option(None, help="Override the splice layout: v15 | head."),
):
    """Family, resolved config, tokens per image, parameter counts and weight bytes of a checkpoint."""
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.info import checkpoint_info, print_info

    src = _checkpoint(checkpoint)
    ckpt = load_checkpoint(src.path, **src.overrides(token_order, splice))
    w, h = _parse_size(image_size)
    data = checkpoint_info(ckpt, w, h)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        print_info(data)


@app.command()
def fixture(
    family: str = typer.Argument(..., help="vila1.5 | vila1.5-s2 | nvila | nvila-lite | clip | intern | ps3"),
    out: Path = typer.Argument(..., help="Folder to write the checkpoint to."),
    seed: int = typer.Option(0, help="Weight seed."),
    layout: str = typer.Option("dev", help="dev | hf"),
):
    """Write a tiny random checkpoint in the real on-disk format (for trying the pipeline offline)."""
    from vila_edge.testing import FAMILY_NAMES, make_tiny_checkpoint

    if family not in FAMILY_NAMES:
        raise VilaEdgeError(f"family {family!r} is not one of: {', '.join(FAMILY_NAMES)}")
    path = make_tiny_checkpoint(family, out, seed, layout=layout)
    typer.echo(str(path))


@app.command()
def plan(
    model: str = typer.Argument(..., help="Checkpoint folder, hub id org/name[@revision] (a known id is planned from "
                                "`vila-edge models` without downloading), or a preset: vila1.5-3b | vila1.5-40b | nvila-lite-2b | nvila-8b."),
    device: str = typer.Option(..., "--device", "-d", help="Device profile (build/profiles/*.toml), e.g. orin-nano-8gb."),
    max_context: int | None = typer.Option(None, min=1, help="KV cache positions (default: the model's max length)."),
    max_tiles: int | None = typer.Option(None, help="Largest tile count of one image (default: the model's max_tiles)."),
    llm_precision: str = typer.Option("int4", help="LLM weights: int4 | int8 | fp8 | fp16."),
    vision_precision: str | None = typer.Option(None, help="Vision tower weights: fp16 | fp32 | fp8 | int8 (default fp16 on GPUs, fp32 on CPUs)."),
    single_scale: bool = typer.Option(False, "--single-scale", help="Run the vision tower at one scale instead of S2."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    backend: str = typer.Option("native", help="native (TensorRT / ONNX Runtime) | torch (the PyTorch backend's "
                                "efficiencies, estimates until measured)."),
    kv_dtype: str | None = typer.Option(None, "--kv-dtype", help="KV cache as built (`build --kv-dtype`): float16 | "
                                        "float32 (default: a default build's, fp32 for int4/int8 on CPUs)."),
):
    """Memory budget and predicted speed of a model on a device; exits 2 with one line if it does not fit."""
    from vila_edge.catalog import find_known
    from vila_edge.hub import parse_hub_id
    from vila_edge.plan import plan as make_plan
    from vila_edge.plan import print_plan

    hub = None if Path(model).exists() else parse_hub_id(model)
    known = find_known(hub.repo) if hub else None
    target = known.preset.config() if known else (_checkpoint(model).path if hub else model)
    p = make_plan(target, device, max_context=max_context, max_tiles=max_tiles, llm_precision=llm_precision,
                  vision_precision=vision_precision, single_scale=single_scale, backend=backend, kv_dtype=kv_dtype)
    if hub:
        p.model = hub.name
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2, default=str))
        if not p.fits:
            raise typer.Exit(2)
        return
    if not p.fits:
        raise VilaEdgeError(p.refusal())
    print_plan(p)


@app.command()
def serve(
    engines: list[Path] = typer.Argument(..., help="Engine directories (vila-edge build output); each is a model, "
                                         "named after its folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, help="Port (0: a free one, printed at start)."),
    api_key: str | None = typer.Option(None, envvar="VILA_EDGE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' (env VILA_EDGE_API_KEY)."),
    allow_remote_images: bool = typer.Option(False, help="Also fetch http(s) image URLs from public addresses (default: data URLs only)."),
    allow_image_network: list[str] = typer.Option([], help="With --allow-remote-images: a private network image URLs may point into, CIDR (repeatable), e.g. 192.168.1.0/24 for LAN cameras."),
    max_queue: int = typer.Option(8, min=0, help="Requests that may wait for the engine; beyond: HTTP 429."),
    request_timeout: float = typer.Option(300.0, min=0.1, help="Seconds from acceptance to the last token."),
    max_tokens: int = typer.Option(1024, min=1, help="Largest max_tokens a request may ask for (and the default)."),
    max_images: int = typer.Option(4, min=0, help="Images per request."),
    max_image_mb: float = typer.Option(10.0, min=0.001, help="Bytes per image, in MiB (encoded)."),
    max_image_pixels: int = typer.Option(4096 * 4096, min=1, help="Pixels per image (width x height)."),
    max_body_mb: float = typer.Option(20.0, min=0.001, help="Request body size, in MiB."),
    camera: str | None = typer.Option(None, help="Live page: camera index, device, video file or stream URL."),
    prompt: str = typer.Option("Describe what you see in one sentence.", help="Live page: question about each frame."),
    interval: float = typer.Option(2.0, min=0.0, help="Live page: seconds between one caption and the next."),
    caption_tokens: int = typer.Option(48, min=1, help="Live page: max tokens per caption."),
    dedup_threshold: float = typer.Option(2.0, "--dedup-threshold", help="Live page: caption a frame only when its "
                                          "64x36 grayscale thumbnail differs from the last captioned frame's by at "
                                          "least this mean absolute difference, in grey levels 0-255 (0: caption "
                                          "the newest frame every interval)."),
    watch_ask: str | None = typer.Option(None, "--watch-ask", help="Watch the camera: ask this question instead of "
                                         "--prompt about each new frame (--dedup-threshold, --interval), the answer "
                                         "held to --watch-schema; change events at /watch/events (server-sent "
                                         "events) and on the page."),
    watch_schema: Path | None = typer.Option(None, "--watch-schema", help="With --watch-ask: JSON schema file of the "
                                             "answer; an event is emitted when the answer changes."),
    watch_webhook: str | None = typer.Option(None, "--watch-webhook", help="With --watch-ask: also POST each event "
                                             "(JSON) to this URL: loopback, or in --allow-webhook-network."),
    allow_webhook_network: list[str] = typer.Option([], "--allow-webhook-network", help="With --watch-webhook: a "
                                                    "network the webhook may reach besides loopback, CIDR "
                                                    "(repeatable), e.g. 192.168.1.0/24."),
    watch_max_tokens: int = typer.Option(64, "--watch-max-tokens", min=1, help="With --watch-ask: maximum tokens "
                                         "per answer (an answer cut before its JSON ends is no event)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | tensorrt"),
    threads: int | None = typer.Option(None, min=1, help="Engine threads (default: physical cores)."),
    vision_cache_mb: float | None = typer.Option(None, min=0, help=VISION_CACHE_HELP),
    prefix_reuse: bool = typer.Option(True, help="Keep the KV cache of the start a request shares with the "
                                      "previous one (a resent conversation is not prefilled again)."),
    log_level: str = typer.Option("info", help="critical | error | warning | info | debug"),
    cluster: str | None = typer.Option(None, help="Serve on a Ray cluster: auto (join this machine's, else start "
                                       "one) | local (start one) | HEAD:6379 (join); needs the `ray` extra."),
    replicas: int = typer.Option(1, min=1, help="With --cluster: replicas of the model (each loads the engines)."),
    max_replicas: int | None = typer.Option(None, min=1, help="With --cluster: autoscale up to this many replicas."),
    node_profile: str | None = typer.Option(None, help="With --cluster: device profile of the GPU nodes (e.g. "
                                            "orin-nano-8gb): a replica reserves the GPU share the planner predicts."),
):
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health, /metrics, /stats) and a live camera
    page (--camera), optionally watching the camera for answer changes (--watch-ask, /watch/events)."""
    from vila_edge.serve import bind_socket, is_loopback, run
    from vila_edge.serve.app import ServeSettings, create_app, make_watch
    from vila_edge.serve.engine import load_engines
    from vila_edge.serve.openai_schema import Limits
    from vila_edge.serve.remote import parse_networks

    watch = _serve_watch_options(camera, watch_ask, watch_schema, watch_webhook, allow_webhook_network,
                                 watch_max_tokens)
    mib = 1024 * 1024
    settings = ServeSettings(
        limits=Limits(max_body_bytes=int(max_body_mb * mib), max_image_bytes=int(max_image_mb * mib),
                      max_image_pixels=max_image_pixels, max_images=max_images, max_tokens=max_tokens),
        max_queue=max_queue, request_timeout=request_timeout, allow_remote_images=allow_remote_images,
        remote_image_networks=parse_networks(allow_image_network),
        api_key=api_key or None, allowed_hosts=(host,), camera_prompt=prompt, camera_interval=interval, camera_max_tokens=caption_tokens,
        camera_dedup_threshold=dedup_threshold, **watch)
    if camera is not None:
        from vila_edge.media.frame_dedup import FrameDedup

        FrameDedup(dedup_threshold)  # a bad --dedup-threshold is one line, before anything loads
        make_watch(settings)  # and so is a watch setting (llguidance compiles the schema here)
    if cluster is not None:
        _serve_cluster(engines, settings, cluster=cluster, host=host, port=port, api_key=api_key, device=device,
                       threads=threads, replicas=replicas, max_replicas=max_replicas, node_profile=node_profile,
                       camera=camera, load_kwargs={"vision_cache_mb": vision_cache_mb, "prefix_reuse": prefix_reuse})
        return
    sock = bind_socket(host, port)  # before loading engines: a busy port fails fast
    models = load_engines(engines, device=device, threads=threads, vision_cache_mb=vision_cache_mb,
                          prefix_reuse=prefix_reuse)
    cam = None
    if camera is not None:
        from vila_edge.serve.live import open_camera

        cam = open_camera(camera)
    if not is_loopback(host) and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the "
              f"models" + (" and see the camera" if cam else ""), file=sys.stderr)

    def ready(url: str) -> None:
        names = ", ".join(m.model_id for m in models)
        print(f"vila-edge: serving {names} at {url}/v1" + (f"; camera page {url}/" if cam else "")
              + (f"; watch events {url}/watch/events" if watch else ""), file=sys.stderr, flush=True)

    def stopped() -> None:
        print("vila-edge: stopped", file=sys.stderr, flush=True)

    run(create_app(models, settings, camera=cam), log_level=log_level, on_listen=ready, on_stop=stopped, sock=sock)


def _serve_watch_options(camera, ask, schema, webhook, networks, max_tokens) -> dict:
    """`serve`'s --watch-* options as ServeSettings fields ({} without --watch-ask); misuse is one line."""
    from vila_edge.structured import read_schema_file

    if ask is None:
        stray = [flag for flag, v in (("--watch-schema", schema), ("--watch-webhook", webhook),
                                      ("--allow-webhook-network", networks)) if v]
        if stray:
            raise VilaEdgeError(f"{stray[0]} applies to a camera watch: add --watch-ask QUESTION (and --camera SRC)")
        return {}
    if camera is None:
        raise VilaEdgeError("--watch-ask needs --camera SRC: the watch asks about the camera's frames (for a video "
                            "file without a server: vila-edge watch ENGINES VIDEO --ask ... --schema ...)")
    if schema is None:
        raise VilaEdgeError("--watch-ask needs --watch-schema FILE: the JSON schema of the answer (events compare "
                            "structured answers)")
    if networks and webhook is None:
        raise VilaEdgeError("--allow-webhook-network applies to --watch-webhook URL: add one")
    try:
        schema_text = read_schema_file(schema)
    except VilaEdgeError as exc:
        raise VilaEdgeError(f"--watch-schema {exc}") from None
    from vila_edge.serve.remote import parse_networks

    return {"watch_question": ask, "watch_schema": schema_text, "watch_max_tokens": max_tokens,
            "watch_webhook": webhook,
            "watch_webhook_networks": parse_networks(networks, "--allow-webhook-network")}


def _serve_cluster(engines, settings, *, cluster, host, port, api_key, device, threads, replicas, max_replicas,
                   node_profile, camera, load_kwargs: dict) -> None:
    from vila_edge.serve import is_loopback
    from vila_edge.serve.cluster import ClusterOptions, serve_cluster

    if camera is not None:
        raise VilaEdgeError("--camera is served by one `vila-edge serve` process, not by --cluster")
    if not is_loopback(host) and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the "
              "models", file=sys.stderr)
    opts = ClusterOptions(replicas=replicas, max_replicas=max_replicas, threads=threads or 1,
                          node_profile=node_profile, max_queue=settings.max_queue)

    def ready(url: str) -> None:
        print(f"vila-edge: serving {engines[0].name} at {url}/v1 on a Ray cluster (replicas: {replicas}"
              f"{'-' + str(max_replicas) if max_replicas else ''})", file=sys.stderr, flush=True)

    serve_cluster(engines, settings, opts, cluster=cluster, host=host, port=port, load_kwargs={"device": device, **load_kwargs},
                  on_listen=ready, on_stop=lambda: print("vila-edge: stopped", file=sys.stderr, flush=True))


@app.command()
def chat(
    engines: str = typer.Argument(..., help="Engine directory, or a checkpoint folder or hub id org/name[@revision] "
                                  "(its engines are built on first use)."),
    image: list[Path] = typer.Option(None, "--image", help="Image file (repeatable)."),
    video: Path | None = typer.Option(None, "--video", help="Video file (frames sampled per the checkpoint)."),
    camera: str | None = typer.Option(None, "--camera", help="Camera: index (0), device path, rtsp/http URL, "
                                      "GStreamer pipeline (contains '!'), or a video file as a stand-in."),
    prompt: str | None = typer.Option(None, "--prompt", help="Answer this and exit (non-interactive)."),
    as_json: bool = typer.Option(False, "--json", help="With --prompt/--interval: print JSON with timings."),
    interval: float | None = typer.Option(None, "--interval", help="Live mode: ask about the newest camera frame "
                                          "every S seconds (0: one answer after another)."),
    dedup_threshold: float = typer.Option(2.0, "--dedup-threshold", help="Live mode: skip frames whose 64x36 "
                                          "grayscale thumbnail differs from the last captioned frame's by less "
                                          "than this mean absolute difference, in grey levels 0-255 (0: off)."),
    pipeline: bool = typer.Option(True, "--pipeline/--no-pipeline", help="Live mode: encode the next frame while "
                                  "the current answer streams (vision and LLM at once)."),
    max_new_tokens: int = typer.Option(256, help="Maximum tokens per answer."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, help="Top-k sampling (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="HF-style repetition penalty (1 = off)."),
    seed: int | None = typer.Option(None, help="Sampling seed."),
    stop: list[str] = typer.Option(None, "--stop", help="Extra stop string (repeatable)."),
    prompt_lookup: int = typer.Option(0, "--prompt-lookup", min=0, max=16, help="Speculative decoding: draft up "
                                      "to N tokens per step from the conversation's earlier text and verify them "
                                      "in one run, as far as it pays (greedy only; 0 = off). Pays off when answers "
                                      "quote the prompt or earlier answers (benchmarks/results/speculative_decode.md)."),
    json_schema: Path | None = typer.Option(None, "--json-schema", help="Answers are JSON valid against this JSON "
                                            "schema file (enforced while decoding)."),
    json_object: bool = typer.Option(False, "--json-object", help="Answers are a JSON object (any keys)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | tensorrt"),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (default: physical cores)."),
    max_context: int | None = typer.Option(None, min=1, help="Cap the KV cache (positions)."),
    vision_cache_mb: float | None = typer.Option(None, min=0, help=VISION_CACHE_HELP),
    engine_dir: Path | None = typer.Option(None, "--engine-dir", help="Where to build engines when ENGINES is a "
                                           "checkpoint (default ./engines/<name>)."),
    precision: str | None = typer.Option(None, help="LLM precision when building (builder default otherwise)."),
    backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | torch (vision and LLM engines; "
                                "torch needs a build with --torch-weights)."),
    vision_precision: str | None = typer.Option(None, "--vision-precision", help="ONNX Runtime vision tower: "
                                                "fp32 | fp16 | int8 (default: int8 on CPUs when the build recorded "
                                                "its cosine vs fp32 >= 0.995, else fp32)."),
):
    """Chat with a model about images, a video or a live camera (interactive, --prompt, or --interval)."""
    from vila_edge.builder.build import ensure_engine_dir
    from vila_edge.chat import run_chat_cli
    from vila_edge.generate import SamplingParams
    from vila_edge.structured import cli_schema

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()),
                            json_schema=cli_schema(json_schema, json_object), prompt_lookup=prompt_lookup)
    src = _checkpoint(engines)
    if src.hub and engine_dir is None:
        engine_dir = Path("engines") / src.name
    code = run_chat_cli(src.path, images=image or (), video=video, camera=camera, prompt=prompt, as_json=as_json,
                        interval=interval, params=params, device=device, threads=threads, max_context=max_context,
                        vision_cache_mb=vision_cache_mb,
                        ensure_engine=lambda path, say: ensure_engine_dir(path, output=engine_dir, precision=precision,
                                                                          say=say),
                        backend=backend, dedup_threshold=dedup_threshold, pipelined=pipeline,
                        vision_precision=vision_precision)
    if code:
        raise typer.Exit(code)


@app.command()
def watch(
    engines: str = typer.Argument(..., help="Engine directory, or a checkpoint folder or hub id (built on first use)."),
    src: str = typer.Argument(..., help="Video file, or a camera: index (0), device path, rtsp/http URL, GStreamer "
                              "pipeline."),
    ask: str = typer.Option(..., "--ask", help="The question asked about every new frame."),
    schema: Path = typer.Option(..., "--schema", help="JSON schema file of the answer; an event is emitted when the "
                                "answer changes."),
    webhook: str | None = typer.Option(None, "--webhook", help="Also POST each event (JSON) to this URL: loopback, "
                                       "or in --allow-webhook-network."),
    allow_webhook_network: list[str] = typer.Option(None, "--allow-webhook-network", help="CIDR the webhook may "
                                                    "reach besides loopback (repeatable), e.g. 192.168.1.0/24."),
    every: int | None = typer.Option(None, "--every", min=1, help="Video files: ask about every N-th frame "
                                     "(default 1)."),
    interval: float | None = typer.Option(None, "--interval", help="Cameras: ask about the newest frame every S "
                                          "seconds (default 1)."),
    min_change: float = typer.Option(2.0, "--min-change", help="Skip frames whose 32x32 grey thumbnail differs from "
                                     "the last one asked about by less than this (mean, 0-255; 0 = ask every frame)."),
    max_new_tokens: int = typer.Option(64, help="Maximum tokens per answer."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | tensorrt"),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (default: physical cores)."),
):
    """Watch a video or camera: ask one question per new frame, print a JSON line when the answer changes."""
    from vila_edge.builder.build import ensure_engine_dir
    from vila_edge.runtime import load
    from vila_edge.structured import read_schema_file
    from vila_edge.watch import run_watch, watch_params

    params = watch_params(read_schema_file(schema), max_new_tokens)
    networks = ()
    if allow_webhook_network:
        from vila_edge.serve.remote import parse_networks

        networks = parse_networks(allow_webhook_network, "--allow-webhook-network")
    ckpt = _checkpoint(engines)
    path = ensure_engine_dir(ckpt.path, output=Path("engines") / ckpt.name if ckpt.hub else None,
                             say=lambda m: print(m, file=sys.stderr))
    pipe = load(path, device=device, threads=threads)
    try:
        run_watch(pipe, src, ask, params, every=every, interval=interval, min_change=min_change, webhook=webhook,
                  allowed_networks=networks)
    finally:
        pipe.close()


@app.command()
def build(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP + " With --stage engines also an exported engine directory."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Engine directory to write (default engines/<checkpoint name>)."),
    precision: str = typer.Option("fp32", "--precision", help="Vision ONNX graphs: fp32 | fp16."),
    int8_vision: bool = typer.Option(False, "--int8-vision", help="Also write an int8 vision tower for CPUs (ONNX Runtime)."),
    qdq_vision: bool = typer.Option(False, "--qdq-vision", help="Also write a QDQ int8 tower for TensorRT int8 engines (experimental: synthetic calibration)."),
    combined_vision: bool = typer.Option(False, "--combined-vision", help="Non-S2 families: also one tower+projector graph/engine with TensorRT-LLM naming (input -> encoder_output)."),
    llm_precision: str = typer.Option("int4", "--llm-precision", help="LLM weights: int4 | int8 | fp8 | fp16 | fp32 "
                                      "(fp8: ONNX QDQ, 128x128 weight and per-token 1x128 activation scales)."),
    fp8_format: str | None = typer.Option(None, "--fp8-format", help="FP8 format of the fp8 parts: e4m3 (default) | e5m2."),
    projector_precision: str | None = typer.Option(None, "--projector-precision", help="fp8: FP8 QDQ projector "
                                                   "(default: as --precision)."),
    llm_quant: str = typer.Option("awq", "--llm-quant", help="int4/int8 LLM quantization: awq | rtn."),
    group_size: int = typer.Option(128, "--group-size", help="LLM quantization group size."),
    awq_calib: str = typer.Option("128x512", "--awq-calib", help="AWQ calibration: sequences x tokens (e.g. 32x512: "
                                  "~4x faster and 4x less activation memory)."),
    awq_grid: int = typer.Option(20, "--awq-grid", help="AWQ scale-search grid points per linear group."),
    kv_dtype: str = typer.Option("float32", "--kv-dtype", help="LLM KV cache and attention: float32 | float16 "
                                 "(half the cache memory; int4 awq/rtn and fp8 builds)."),
    attention: str = typer.Option("gqa", "--attention", help="LLM attention: gqa (ONNX Runtime's GroupQueryAttention) "
                                  "| grouped (experimental: standard ops, one GEMM per KV head; on 2 CPU cores "
                                  "decode 1.00x at 2000 cached positions, 0.79x at 300, prefill 0.79x; int4 "
                                  "awq/rtn and fp8 builds)."),
    skip_llm: bool = typer.Option(False, "--skip-llm", help="Build the vision part only."),
    torch_weights: bool = typer.Option(False, "--torch-weights", help="Also write the torch backend's weights "
                                       "(fp16 vision, int4 LLM in the int4pack layout; FP8 linears with "
                                       "--llm-precision / --projector-precision fp8) next to the ONNX files."),
    stage: str = typer.Option("all", "--stage", help="all | export (portable ONNX, any machine) | engines (TensorRT, on the target)."),
    trt_precision: str = typer.Option("fp16", "--trt-precision", help="TensorRT engines: fp16 | fp32 | int8 (needs --qdq-vision at export)."),
    trt_workspace_gb: float = typer.Option(2.0, "--trt-workspace-gb", help="TensorRT builder workspace limit (GiB)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan with estimated disk and memory; write nothing."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if up to date; replace a non-engine directory."),
    token_order: str | None = typer.Option(None, help="Override the mlp_downsample token order: row | col."),
    splice: str | None = typer.Option(None, help="Override the splice layout: v15 | head."),
    chat_format: str | None = typer.Option(None, help="Override the chat format: vicuna_v1 | llama_3 | hermes-2 | auto."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for export, quantization and checks."),
    device: str | None = typer.Option(None, "--device", help="Refuse the build unless the plan fits this device profile "
                                      "(see `vila-edge plan`), e.g. orin-nano-8gb."),
    max_context: int | None = typer.Option(None, min=1, help="With --device: the KV cache size the plan budgets "
                                           "(run chat/serve with the same --max-context)."),
    max_tiles: int | None = typer.Option(None, help="With --device: the most tiles per image the plan budgets."),
):
    """Build an engine directory: vision ONNX (+ int8 CPU tower), LLM ONNX, TensorRT engines on GPUs."""
    from vila_edge.builder.build import BuildOptions
    from vila_edge.builder.build import build as run_build

    src = _checkpoint(checkpoint)
    known = src.overrides(token_order, splice, chat_format)
    token_order, splice, chat_format = known["token_order"], known["splice"], known["chat_format"]
    if src.hub and output is None:
        output = Path("engines") / src.name
    if device is not None and stage != "engines":
        from vila_edge.checkpoint import load_checkpoint
        from vila_edge.plan import check_plan_fits

        ckpt = load_checkpoint(src.path, token_order=token_order, splice=splice, chat_format=chat_format)
        fitted = check_plan_fits(ckpt, device, max_context=max_context, max_tiles=max_tiles, llm_precision=llm_precision)
        typer.echo(f"plan fits {device}: {fitted.memory['total'] / 2**30:.2f} GiB of {fitted.memory['usable'] / 2**30:.2f} GiB usable")

    opts = BuildOptions(precision=precision, int8_vision=int8_vision, qdq_vision=qdq_vision, combined_vision=combined_vision,
                        llm_precision=llm_precision, llm_quant=llm_quant, group_size=group_size, skip_llm=skip_llm,
                        awq_calib=awq_calib, awq_grid=awq_grid, kv_dtype=kv_dtype, attention=attention,
                        token_order=token_order, splice=splice, chat_format=chat_format, trt_precision=trt_precision,
                        trt_workspace_gb=trt_workspace_gb, torch_weights=torch_weights,
                        projector_precision=projector_precision, fp8_format=fp8_format)
    try:
        result = run_build(src.path, output, options=opts, stage=stage, dry_run=dry_run, force=force, threads=threads)
    except KeyboardInterrupt:
        # typer turns Ctrl-C into a silent exit 130; say what happened to the output.
        print("interrupted: the build stopped and its partial output was removed", file=sys.stderr)
        raise typer.Exit(130) from None
    if result.status != "planned":
        typer.echo(str(result.path))


@app.command()
def models(
    device: list[str] = typer.Option(None, "--device", "-d", help="Only these device profiles (repeatable); with one, "
                                     "the knob that makes it fit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Known released checkpoints: family, token order, splice, chat format, int4 size, which devices fit."""
    from vila_edge.catalog import print_models, rows
    from vila_edge.plan import load_profile

    for d in device or ():
        load_profile(d)  # an unknown profile: one line listing the known ones
    table = rows(list(device) if device else None)
    if as_json:
        typer.echo(json.dumps(table, indent=2))
    else:
        print_models(table)


from vila_edge.demo.cli import register as _register_demo_commands  # noqa: E402  (demo, eval)

_register_demo_commands(app)


@app.command()
def bench(
    engines: list[Path] = typer.Argument(None, help="Engine directories (vila-edge build output)."),
    preset: str | None = typer.Option(None, help="Benchmark a geometry preset with random weights instead: "
                                      "vila1.5-3b | nvila-lite-2b | nvila-8b (written and built under --work-dir)."),
    work_dir: Path = typer.Option(Path("bench-work"), help="Where preset checkpoints and engines are kept."),
    image_size: list[str] = typer.Option(["1920x1080"], help="Image sizes WIDTHxHEIGHT (repeatable)."),
    prompt_tokens: list[int] = typer.Option([32], help="Text prompt lengths in tokens (repeatable)."),
    new_tokens: int = typer.Option(128, help="Tokens generated per run (stop tokens ignored)."),
    runs: int = typer.Option(3, help="Measured runs per case (the median is reported)."),
    warmup: int = typer.Option(1, help="Unmeasured warm-up runs per engine."),
    threads: int | None = typer.Option(None, min=1, help="Engine threads (default: physical cores)."),
    device: str | None = typer.Option(None, help="Also report the planner's prediction for this device profile."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", "-o", help="Folder for bench_*.json and .png."),
    llm_only: bool = typer.Option(False, help="Decode-only benchmark of the LLM (no image)."),
    vision_precision: str | None = typer.Option(None, "--vision-precision", help="Vision tower graph: fp32 | fp16 | "
                                                "int8 (default: the runtime's choice, int8 on CPUs when its recorded "
                                                "cosine vs fp32 >= 0.995)."),
):
    """Vision latency per tile, time to first token by stage, decode tok/s, peak memory; JSON + PNG + table."""
    from vila_edge.bench import BenchOptions, run_bench_cli

    opts = BenchOptions(image_sizes=[_parse_size(s) for s in image_size], prompt_tokens=list(prompt_tokens),
                        new_tokens=new_tokens, runs=runs, warmup=warmup, threads=threads, device=device,
                        llm_only=llm_only, vision_precision=vision_precision)
    run_bench_cli(list(engines or []), opts, out=out, preset=preset, work_dir=work_dir)


def main() -> None:
    try:
        app()
    except VilaEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
