"""`mst-clipiqa serve`: a model's scores over HTTP, batched across requests by LitServe.

Requests are checked one by one (`ScoreAPI._job`, `RequestGuard`) and answered with a one-line 4xx naming the image
at fault; the images of a batch are scored by the `Scorer` engine, so a served score is the file-scored one.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
import multiprocessing
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mst_clipiqa.errors import BadRowError, MSTCLIPIQAError, OptionError

try:
    import litserve as ls
except ImportError as err:
    raise MSTCLIPIQAError("mst-clipiqa serve needs LitServe: pip install 'mst-clipiqa[serve]'") from err

API_PATH = "/predict"
HEALTH_PATH = "/health"
OPEN_PATHS = frozenset({HEALTH_PATH, "/docs", "/openapi.json"})
"""What answers without the API key: the health check (load balancers call it without keys) and the API page."""
API_KEY_ENV = "MST_CLIPIQA_API_KEY"
FIELDS = ("image", "images", "path", "paths", "prompt", "prompts")
USAGE = 'send {"images": [base64, ...], "prompts": [...]} as JSON, or a multipart upload of "image" files'


class Refused(Exception):
    """A request the server answers with `status` and the one-line `reason`, without scoring it."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Job:
    """A request's images (bytes, or a file's {"path", "bytes"}) and the prompt head's prompts."""

    sources: list[Any]
    prompts: list[str] | None


def key_refusal(api_key: str | None, headers: dict[str, str]) -> str | None:
    """Why a request's headers lack the API key (X-API-Key, or Authorization: Bearer), or None when they hold it."""
    if api_key is None:
        return None
    given = headers.get("x-api-key") or ""
    if not given and headers.get("authorization", "").lower().startswith("bearer "):
        given = headers["authorization"][7:].strip()
    if secrets.compare_digest(given.encode(), api_key.encode()):
        return None
    return "missing or wrong API key: send it in the X-API-Key header"


def error_response(status: int, reason: str) -> ls.Response:
    """The answer to a request refused: its status and {"detail": the one-line reason}, as FastAPI's errors."""
    return ls.Response(json.dumps({"detail": reason}), status_code=status, media_type="application/json")


class ScoreAPI(ls.LitAPI):
    """The model behind LitServe: each worker loads it on its device (`serve`'s options); a request is checked as it
    comes (`decode_request`), and a batch is every image of the requests LitServe gathered (`predict`)."""

    def __init__(
        self,
        model: str,
        *,
        name: str,
        mos_range: tuple[float, float],
        needs_prompt: bool,
        revision: str | None,
        precision: str | None,
        max_images: int,
        max_bytes: int,
        image_root: Path | None,
        threads: int | None,
        max_batch_size: int,
        batch_timeout: float,
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.model, self.revision, self.precision, self.threads = model, revision, precision, threads
        self.about = {"model": name, "mos_range": list(mos_range)}
        self.needs_prompt = needs_prompt
        self.max_images, self.max_bytes, self.image_root = max_images, max_bytes, image_root

    def setup(self, device: str) -> None:
        import torch

        from mst_clipiqa.scoring.scorer import load_scorer

        # Ctrl-C reaches every process of the terminal's group: the server's own process stops this one, which
        # would otherwise die mid-call with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.threads:
            torch.set_num_threads(self.threads)
        self.scorer = load_scorer(self.model, device, self.precision, revision=self.revision)

    def decode_request(self, request):  # unannotated: LitServe hands over the parsed body then
        # A refusal is returned, not raised: LitServe would answer every request of the batch with it.
        try:
            return self._job(request)
        except Refused as refusal:
            return refusal

    def predict(self, jobs: list[Job | Refused]) -> list[dict[str, list[float]] | Refused]:
        """Every image of the batch's requests, scored as `Scorer.iter_scores` scores them; an image that does not
        decode refuses its request, the others' are scored as usual."""
        outputs: list[dict[str, list[float]] | Refused] = [
            job if isinstance(job, Refused) else {"scores": [], "coarse_share": []} for job in jobs
        ]
        rows = [(k, i) for k, job in enumerate(jobs) if isinstance(job, Job) for i in range(len(job.sources))]
        sources = [jobs[k].sources[i] for k, i in rows]
        prompts = [jobs[k].prompts[i] for k, i in rows] if self.needs_prompt else None
        scored = self.scorer.scores_and_shares(sources, prompts, self.scorer.default_batch_size, skip_bad=True)
        for (k, i), (score, share, error) in zip(rows, scored):
            if isinstance(outputs[k], Refused):
                continue
            if error is not None:
                outputs[k] = Refused(422, f"image {i + 1} of {len(jobs[k].sources)}: {error}")
                continue
            outputs[k]["scores"].append(score)
            outputs[k]["coarse_share"].append(share)
        return outputs

    def encode_response(self, output):  # unannotated: LitServe would make the annotation the route's response model
        if isinstance(output, Refused):
            return error_response(output.status, output.reason)
        return {**self.about, **output}

    # ---- one request ---------------------------------------------------------------------------------------------

    def _job(self, request: Any) -> Job:
        from mst_clipiqa.scoring.scorer import checked_prompts

        if not isinstance(request, dict):
            raise Refused(400, f"the body is not a JSON object: {USAGE}")
        unknown = sorted(set(request) - set(FIELDS))
        if unknown:
            raise Refused(400, f"unknown field {', '.join(map(repr, unknown))}: the fields are {', '.join(FIELDS)}")
        kinds = [kind for kind in ("image", "images", "path", "paths") if kind in request]
        if len(kinds) != 1:
            raise Refused(400, f"give one of image, images, path or paths: {USAGE}")
        kind = kinds[0]
        items = [request[kind]] if kind in ("image", "path") else request[kind]
        if not isinstance(items, list) or not items:
            raise Refused(400, f"{kind} must be a non-empty list")
        if len(items) > self.max_images:
            raise Refused(413, f"{len(items)} images in one request; this server takes at most {self.max_images}")
        if "prompt" in request and "prompts" in request:
            raise Refused(400, "give prompt (one image) or prompts (one per image), not both")
        prompts = [request["prompt"]] if "prompt" in request else request.get("prompts")
        if prompts is not None and (
            not isinstance(prompts, list) or not all(p is None or isinstance(p, str) for p in prompts)
        ):
            raise Refused(400, "prompts must be a list of strings, one per image")
        read = self._read_path if kind.startswith("path") else _base64_image
        sources = [read(item, f"image {i + 1} of {len(items)}") for i, item in enumerate(items)]
        if self.needs_prompt:
            try:
                prompts = checked_prompts(items if kind.startswith("path") else sources, prompts)
            except BadRowError as err:
                raise Refused(422, str(err)) from err
            except ValueError as err:
                raise Refused(400, f"{err}: give one prompt per image") from err
        else:
            prompts = None  # the template head reads none, as `score` ignores a table's prompts for it
        return Job(sources, prompts)

    def _read_path(self, given: Any, which: str) -> dict[str, Any]:
        """The file's bytes, named by the path as given; symlinks and .. are resolved first, so that nothing outside
        the image folder is read."""
        if self.image_root is None:
            raise Refused(403, f"this server reads no paths (no --image_root): {USAGE}")
        if not isinstance(given, str) or not given:
            raise Refused(400, f"{which}: a path must be a non-empty string")
        path = (self.image_root / given).resolve()
        if not path.is_relative_to(self.image_root):
            raise Refused(403, f"{which}: {given} is outside the image folder")
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise Refused(413, f"{which}: {given} has {size} bytes; the limit is {self.max_bytes}")
            return {"path": given, "bytes": path.read_bytes()}
        except FileNotFoundError as err:
            raise Refused(422, f"{which}: image file not found: {given}") from err
        except OSError as err:  # a folder, no permission
            raise Refused(422, f"{which}: cannot read {given}: {err.strerror}") from err


def _base64_image(given: Any, which: str) -> bytes:
    if not isinstance(given, str):
        raise Refused(400, f"{which}: an image must be a base64 string")
    if given.startswith("data:") and "," in given:  # a data URL, as a browser's FileReader gives
        given = given.split(",", 1)[1]
    try:
        return base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError) as err:
        raise Refused(400, f"{which}: not base64 ({err})") from err


class RequestGuard:
    """ASGI middleware before LitServe's routes: the API key on all but `OPEN_PATHS` (401), then, on the scoring
    route, the body's size (413), a body that is not JSON (400, not LitServe's 500), and a multipart upload turned
    into the JSON request, so that LitServe reads every body as JSON."""

    def __init__(self, app: Any, *, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if scope["path"] not in OPEN_PATHS and (reason := key_refusal(self.api_key, headers)):
            await _answer(scope, receive, send, 401, reason)
            return
        if scope["method"] != "POST" or scope["path"] != API_PATH:
            await self.app(scope, receive, send)
            return
        too_large = f"the request body exceeds {self.max_bytes} bytes (--max_request_mb)"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await _answer(scope, receive, send, 413, too_large)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await _answer(scope, receive, send, 413, too_large)
                return
        content_type = headers.get("content-type", "")
        upload = content_type.startswith("multipart/form-data")
        try:
            if upload:
                body = multipart_to_json(content_type, bytes(body))
            else:  # JSON under any other type too: `curl -d` labels it a form
                json.loads(body)
        except ValueError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            reason = f"the upload: {first}" if upload else f"the body is not JSON ({first}): {USAGE}"
            await _answer(scope, receive, send, 400, reason)
            return
        kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        extra = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app({**scope, "headers": kept + extra}, replay, send)


def multipart_to_json(content_type: str, body: bytes) -> bytes:
    """A multipart/form-data upload of "image" files and "prompt" fields, in order, as the JSON request's body; a
    ValueError for anything else."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("not a multipart body")
    images: list[str] = []
    prompts: list[str] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            images.append(base64.b64encode(payload).decode("ascii"))
        elif name == "prompt":
            prompts.append(payload.decode("utf-8", errors="replace"))
        else:
            raise ValueError(f"form field {name!r}: upload images as 'image' files and prompts as 'prompt' fields")
    if not images:
        raise ValueError("no 'image' file in the upload")
    return json.dumps({"images": images, **({"prompts": prompts} if prompts else {})}).encode()


async def _answer(scope: dict, receive: Any, send: Any, status: int, reason: str) -> None:
    await error_response(status, reason)(scope, receive, send)


# ---- the command ---------------------------------------------------------------------------------------------------


def serve(
    model: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    max_batch_size: int = 32,
    batch_timeout: float = 0.01,
    precision: str | None = None,
    revision: str | None = None,
    name: str | None = None,
    api_key: str | None = None,
    image_root: str | None = None,
    max_images: int = 256,
    max_request_mb: float = 64,
    timeout: float = 60,
) -> None:
    """What `mst-clipiqa serve` runs (its options: `mst_clipiqa.cli.commands.serve`): the model is loaded here once,
    so a wrong MODEL ends in one line before any worker starts, then LitServe serves it until SIGTERM or Ctrl-C."""
    import torch

    from mst_clipiqa.hub.pretrained import from_pretrained
    from mst_clipiqa.training.lit_module import base_model

    if not 1024 <= port <= 65535:
        raise OptionError(f"--port {port}: choose 1024 to 65535")
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise OptionError(f"--host {host}: choose 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface)")
    for option, value in (("max_batch_size", max_batch_size), ("workers_per_device", workers_per_device),
                          ("max_images", max_images)):  # fmt: skip
        if value < 1:
            raise OptionError(f"--{option} {value}: give 1 or more")
    if batch_timeout < 0 or batch_timeout >= timeout or max_request_mb <= 0:
        raise OptionError("--batch_timeout must be 0 or more and below --timeout; --max_request_mb above 0")
    root = None
    if image_root is not None:
        root = Path(image_root).expanduser().resolve()
        if not root.is_dir():
            raise NotADirectoryError(f"--image_root {image_root}: no such folder")
    try:
        socket.create_server((host, port)).close()
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)
        raise OptionError(f"--port {port}: cannot listen on {host}:{port}: {why}; choose another port") from err
    accelerator = {"gpu": "cuda"}.get(accelerator, accelerator)
    if accelerator not in ("auto", "cpu", "cuda", "mps"):
        raise OptionError(f"--accelerator {accelerator}: choose auto, cpu, cuda (gpu) or mps")

    module = from_pretrained(model, revision=revision)
    mos_range, needs_prompt = tuple(module.net.mos_range.tolist()), module.net.needs_prompt
    del module
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    max_bytes = int(max_request_mb * 2**20)
    threads = None
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers_per_device)  # the workers share the cores
    name = name or base_model(model)["name"]  # a folder's or checkpoint file's name, or the hub repo id
    api = ScoreAPI(
        model,
        name=name,
        mos_range=mos_range,
        needs_prompt=needs_prompt,
        revision=revision,
        precision=precision,
        max_images=max_images,
        max_bytes=max_bytes,
        image_root=root,
        threads=threads,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
    )
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,
        max_payload_size=max_bytes,
        middlewares=[(RequestGuard, {"api_key": api_key, "max_bytes": max_bytes})],
        model_metadata={**api.about, "head": "prompt" if needs_prompt else "template"},
    )
    if api_key is None and host != "127.0.0.1":
        print(f"warning: serving on {host} without an API key (--api_key or ${API_KEY_ENV})", file=sys.stderr)
    print(
        f"serving {name} (MOS {mos_range[0]:g} to {mos_range[1]:g}) at http://{host}:{port}{API_PATH}; "
        f"{HEALTH_PATH} answers 200 once the workers are ready, /docs is the API page",
        file=sys.stderr,
    )
    _stop_on_signals()
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    finally:
        _stop_children()


def _stop_on_signals() -> None:
    """SIGTERM (docker stop, Kubernetes, kill) and SIGINT (Ctrl-C) take LitServe's Ctrl-C path, which stops its
    workers; the processes this one forks inherit the handler and keep the signals' defaults."""
    main = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != main:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _stop_children() -> None:
    """End the worker processes a shutdown left behind (one during startup, say), so that none outlives the server."""
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(5)
        if child.is_alive():
            child.kill()
