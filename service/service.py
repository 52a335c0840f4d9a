"""The tipsen HTTP service: SDXL + the LoRA bank + the Senior Prompting Assistant, behind adaptive batching.

Configuration comes from `params.yaml` (TIPSEN_PARAMS; profile: TIPSEN_PROFILE) and the bank index TIPSEN_BANK
(default: models/bank.json). Models and the bank load in a background thread: /livez answers at once, /readyz and
the APIs answer 503 until loading is done. After `tipsen bank build` (or `dvc repro`, or a promotion) POST
/bank/reload swaps new and retrained adapters in between two batches, without a restart (tipsen.store).

`bentoml build` packages it for the profile active then: the Bento records that profile, declares the profile's
hub models (service.pack) so that `bentoml containerize` copies their files into the image, and refuses a bank
trained on another base model. A built Bento loads its packed models from those copies; the service itself never
downloads them.

POST /generate (JSON, base64 PNGs), POST /generate_png (one image/png body), POST /refine, GET /keywords,
GET /route, POST /bank/reload, GET / (the web page), /livez, /readyz. POST /generate_batch is private: each handler resolves its request
into a Plan (a bad request is a 400 before it is admitted) and sends the plan there; BentoML's dispatcher forms the
adaptive batches, and each batch is refined by the assistant and drawn together.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles

from service.middleware import INTERNAL_HEADER, INTERNAL_TOKEN, ErrorShape, Guard, PublicDocument, is_loopback, one_line
from tipsen import paths, privacy
from tipsen.assistant import Refinement
from tipsen.bank import require_base
from tipsen.config import API_KEY_ENV, Seed, Slug, load_params
from tipsen.errors import ConfigError
from tipsen.generate import GenerationRequest, PictureRequest, Plan, png_bytes
from tipsen.models import local_snapshot, packed, use_local_copy
from tipsen.privacy import shown
from tipsen.registry import Registry

log = logging.getLogger("tipsen.service")
ROOT = paths.ROOT
STATIC = Path(__file__).resolve().parent / "static"
PARAMS = load_params(os.environ.get("TIPSEN_PARAMS") or ROOT / paths.PARAMS)
GEN, SVC = PARAMS.generate, PARAMS.service
BANK = Path(os.environ.get("TIPSEN_BANK") or ROOT / paths.BANK)
privacy.log_prompts(SVC.log_prompts)
# The hub models a Bento of this profile packs, by reference. Never read them through the service instance:
# BentoML's descriptor would download whatever is missing.
HUB = {ref: bentoml.models.HuggingFaceModel(ref, **files) for ref, files in packed(PARAMS).items()}


def building() -> bool:
    """Whether `bentoml build` is importing this module. BentoML 1.4 sets no flag for it: its build command imports
    the service in the command's own process, while a serving worker has its index set before it imports."""
    click = sys.modules.get("click")  # bentoml's command line runs on click; no click loaded, no command running
    ctx = click.get_current_context(silent=True) if click else None
    return ctx is not None and ctx.command.name == "build" and bentoml.server_context.worker_index is None


if building():
    try:  # the bank the Bento packs (bentofile.yaml) must be for the base model it serves
        require_base(ROOT / paths.BANK, PARAMS.models.base, profile=PARAMS.profile)
    except ConfigError as exc:
        raise SystemExit(f"bentoml build: {exc}") from None  # one line, even under --output tag
    for ref, model in HUB.items():
        try:  # the revision the Bento records, asked of the Hub now rather than in a traceback from BentoML
            model.commit_hash
        except Exception as exc:  # offline, not found, or gated without HF_TOKEN: the reason is in the message
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer"
            raise SystemExit(f"bentoml build: models: cannot read {ref!r} from the Hub ({type(exc).__name__}: "
                             f"{why}); leave it out of service.pack to download it when the container starts") from None


class QuietClientErrors(logging.Filter):
    """BentoML logs every refused request at ERROR with a traceback, and pydantic's message quotes the input: the
    senior's words. A client's mistake is one INFO line naming the fields, never the body; a request shed under load
    (503) is one WARNING line; any other server error keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        status = getattr(getattr(exc, "error_code", None), "value", 500)
        level, what = logging.INFO, "refused"
        if isinstance(exc, ValidationError):
            why = one_line(exc.errors(include_input=False, include_context=False))
        elif isinstance(exc, bentoml.exceptions.BentoMLException) and (status < 500 or status == 503):
            why = f"{type(exc).__name__} ({status})"
            if status == 503:
                level, what, why = logging.WARNING, "shed", f"{exc} ({status})"
        else:
            return True
        path = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg, record.args, record.exc_info, record.exc_text = f"{what} %s: %s", (path, why), None, None
        record.levelno, record.levelname = level, logging.getLevelName(level)
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietClientErrors())

# Over HTTP a prompt longer than generate.max_prompt_chars is refused rather than cut: a page can say so.
Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=GEN.max_prompt_chars)]


def nullable(schema: dict) -> None:
    """Optional fields as OpenAPI 3.0 `nullable` (BentoML's document keeps only the first branch of an anyOf)."""
    for prop in schema.get("properties", {}).values():
        branches = prop.get("anyOf", [])
        if len(branches) == 2 and {"type": "null"} in branches:
            prop.pop("anyOf")
            prop.update(next(b for b in branches if b != {"type": "null"}), nullable=True)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=nullable)


# The request models of tipsen.generate, with the HTTP API's defaults: the assistant on, and the prompt capped.
class PictureInput(PictureRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra=nullable)

    prompt: Prompt
    assist: bool = True


class GenerateInput(GenerationRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra=nullable)

    prompt: Prompt
    assist: bool = True


class RefineInput(Model):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=nullable)

    prompt: Prompt
    keyword: Slug | None = None
    seed: Seed | None = None


class BatchItem(Model):
    images: list[str]  # base64 PNGs
    metadata: dict[str, Any]


class GenerateOutput(Model):
    images: list[str]  # base64-encoded PNGs
    prompt: str  # the prompt SDXL saw (refined when assist is on)
    original: str  # the prompt as sent
    keyword: str | None  # the bank slug used; None: the base model alone
    route: dict[str, Any]  # how the keyword was chosen
    assistant_backend: str | None  # template, transformers or openai; None when assist is off
    refined: dict[str, Any] | None
    seed: int
    steps: int
    guidance: float
    negative_prompt: str  # what the picture was steered away from ("" for nothing)
    sampler: str | None  # the request's sampler; None: the model's own scheduler
    lora_scale: float | None  # None when no adapter was applied
    width: int
    height: int
    model: str
    adapter: str | None  # the LoRA applied; None: the base model alone
    adapter_sha256: str | None  # the applied adapter file's sha256: the exact weights that drew the picture
    adapters: list[dict[str, Any]]  # every adapter drawn, in order: slug, scale and sha256
    bank_version: int  # the bank version that drew it (POST /bank/reload makes a new one)
    timings: dict[str, float]
    warnings: list[str]  # e.g. a routed keyword without an adapter, drawn by the base model


class KeywordOut(Model):
    slug: str
    keyword: str
    ko: str
    class_token: str
    category: str
    available: bool
    reason: str | None  # why the adapter cannot be used (or, while an older version serves, why the new one was not)
    sha256: str | None = None  # the serving adapter file's sha256
    loaded_at: str | None = None  # when the serving file was read (UTC, ISO 8601)
    path: str | None = None  # "store" (the bank's stacked tensors) or "peft" (what the store cannot hold)


class ReloadOut(Model):
    version: int  # the bank version now serving
    seconds: float  # from the call until the new version serves
    added: list[str]
    removed: list[str]
    changed: list[str]
    kept: list[str]  # changed in the index but refused; the version loaded before still serves
    unavailable: dict[str, str]  # slug -> why it cannot be used


class KeywordsOut(Model):
    base_model: str
    device: str
    max_keywords: int  # generate.max_keywords: the most a request may name in `keywords`
    shapes: dict[str, list[int]]  # the page's picture shapes: square, landscape, portrait as [width, height]
    keywords: list[KeywordOut]


class RouteOut(Model):
    slug: str | None
    keyword: str | None
    ko: str | None
    available: bool
    matched: str | None
    source: str  # explicit, alias (a name), words (everyday words) or none
    confidence: float
    also: list[str]  # further keywords recognised, in order of confidence
    ask: list[str]  # keywords only suspected: ask the senior before drawing them


class ErrorOut(Model):
    error: str  # one line naming the field and what is allowed
    detail: str | None = None


class RefineOutput(Refinement):
    model_config = ConfigDict(frozen=True, json_schema_extra=nullable)


def error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "5"} if status in (429, 503) else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def png_b64(image: Image.Image, metadata: dict, index: int) -> str:
    """Image `index` of a result as base64 PNG, carrying how it was made (tipsen.generate.png_bytes)."""
    return base64.b64encode(png_bytes(image, metadata, index)).decode("ascii")


class Slots:
    """Admitted generation work not yet finished. A timed-out request keeps its slot until its work ends."""

    def __init__(self, limit: int):
        self.limit, self.used, self._lock = limit, 0, threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def release(self, n: int = 1) -> None:
        with self._lock:
            self.used -= n


ui = FastAPI(title="tipsen", docs_url=None, redoc_url=None, openapi_url=None)
ui.mount("/ui", StaticFiles(directory=STATIC), name="ui")


@ui.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


BUSY = f"busy: {SVC.max_queue} requests are already waiting (service.max_queue); retry in a few seconds"
NOT_READY = {503: {"model": ErrorOut, "description": "still loading"}}


@bentoml.asgi_app(ui, path="/")
@bentoml.service(
    name="tipsen",
    traffic={"timeout": SVC.timeout_s},  # service.max_concurrency is the Guard's: it counts only bodies read whole
    resources={"gpu": SVC.gpus} if SVC.gpus else {"cpu": "2"},
    workers=1,  # one SDXL pipeline per GPU; scale out with replicas
    endpoints={"livez": "/livez", "readyz": "/readyz"},
    envs=[{"name": "TIPSEN_PROFILE", "value": PARAMS.profile}],  # a Bento serves the profile it was built for
)
class Tipsen:
    packed_base = HUB.get(PARAMS.models.base)  # recorded in the Bento at build; None: nothing to pack
    packed_llm = HUB.get(PARAMS.models.llm)

    def __init__(self) -> None:
        logging.getLogger("tipsen").setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING
        self.loaded, self.failure = threading.Event(), None
        self.gpu = threading.Lock()  # the pipeline and the assistant's LLM share one device: one job at a time
        self.slots = Slots(SVC.max_queue)
        self.generator = self.assistant = self.registry = None
        threading.Thread(target=self._load, name="tipsen-load", daemon=True).start()

    def _load(self) -> None:
        try:
            from tipsen.assistant import Assistant
            from tipsen.generate import Generator

            PARAMS.log(logging.INFO)
            if Tipsen.bento is not None:  # a built Bento: its packed models load from the copies in the image
                self._use_packed()
            self.registry = Registry.load()
            self.registry.route("김장")  # loads the Korean analyser now, not on a senior's first request
            curated = ROOT / paths.CURATED
            self.assistant = Assistant.from_params(PARAMS, registry=self.registry,
                                                   curated=curated if curated.is_dir() else None)
            self.assistant.warm()  # the LLM is part of readiness, not the first senior's wait
            self.generator = Generator(PARAMS, bank=BANK, assistant=self.assistant, registry=self.registry)
            log.info("ready: %s", self.generator.status())
            self.loaded.set()
        except ConfigError as exc:
            self.failure = str(exc)
            log.error("cannot load: %s", exc)
        except Exception:
            self.failure = "loading failed; see the server log"
            log.exception("loading failed")

    def _use_packed(self) -> None:
        cache = os.environ.get("BENTOML_HF_CACHE_DIR")  # set by the Bento's image, where containerize put them
        for ref, model in HUB.items():  # BentoML has set each model's revision to the one the Bento recorded
            if model.model_id.lower() != ref.lower():
                raise ConfigError(f"models: {ref!r} is not the model this Bento packs ({model.model_id!r}); serve "
                                  "the profile it was built for, or build it again")
            path = local_snapshot(model.model_id, revision=model.revision, cache_dir=cache,
                                  files={"include": model.include, "exclude": model.exclude})
            use_local_copy(ref, path)
            log.info("%s: the packed copy at %s", ref, path)

    def __is_ready__(self) -> bool:
        if self.failure is not None:  # BentoML's own 503 would only say "not ready"
            from starlette.exceptions import HTTPException

            raise HTTPException(503, f"not ready: {self.failure}")
        return self.loaded.is_set()

    def __is_alive__(self) -> bool:
        return self.failure is None

    def _unavailable(self) -> JSONResponse | None:
        if self.loaded.is_set():
            return None
        return error(503, f"not ready: {self.failure or 'the models are still loading'}")

    # ---------------------------------------------------------------- generation

    @bentoml.api(batchable=True, max_batch_size=SVC.max_batch_size, max_latency_ms=SVC.max_latency_ms)
    def generate_batch(self, plans: list[Plan]) -> list[BatchItem]:
        """Private: one adaptive batch of resolved plans (mixed keywords allowed), refined and drawn together."""
        try:
            with self.gpu:
                results = self.generator.render(self.generator.refine(plans))
            log.info("batch size %d: keywords %s", len(plans), [r.metadata.get("keyword") for r in results])
            return [BatchItem(images=[png_b64(im, r.metadata, j) for j, im in enumerate(r.images)], metadata=r.metadata)
                    for r in results]
        finally:
            self.slots.release(len(plans))

    async def _generate(self, inp: PictureRequest) -> BatchItem | JSONResponse:
        if (unavailable := self._unavailable()) is not None:
            return unavailable
        try:  # the one validation of this request: a 400 here is never admitted
            plan = self.generator.resolve(inp, refine=False)
        except ConfigError as exc:  # NoTopic too: a 400, the status BentoML's OpenAPI document lists for its APIs
            return error(400, str(exc))
        log.info("request: prompt %s, adapter %s, %d image(s)", shown(inp.prompt), plan.adapter, plan.num_images)
        if not self.slots.acquire():
            return error(429, BUSY)
        # BentoML's pattern: call the batchable API through the service's own client, so the dispatcher batches.
        # Its sessions are built from `default_headers`; the token opens the private route to this process only.
        self.to_async.default_headers[INTERNAL_HEADER] = INTERNAL_TOKEN
        call = asyncio.ensure_future(self.to_async.generate_batch([plan]))
        call.add_done_callback(self._settle)
        try:
            return (await asyncio.shield(call))[0]  # a timeout cancels this wait, not the queued work
        except bentoml.exceptions.BentoMLException as exc:
            if exc.error_code in (429, 503):  # shed by the dispatcher or the concurrency limit
                return error(503, "busy: the batch queue is full; retry in a few seconds")
            raise

    def _settle(self, call: asyncio.Future) -> None:
        """Free the slot of a request that never reached the batch API (that API frees the others)."""
        code = 0 if call.cancelled() else int(getattr(call.exception(), "error_code", 0) or 0)
        if call.cancelled() or 400 <= code < 500 or code == 503:  # 500 and 504: the batch API ran or will run
            self.slots.release(1)

    @bentoml.api(input_spec=GenerateInput)
    async def generate(self, **fields: Any) -> GenerateOutput:
        """Generate images; JSON with base64 PNGs, the refined prompt, the keyword and seed used, and timings."""
        inp = GenerateInput(**fields)
        item = await self._generate(inp)
        if isinstance(item, JSONResponse):
            return item
        out = {k: v for k, v in item.metadata.items() if k in GenerateOutput.model_fields}
        refined = out.get("refined")
        out.update(images=item.images, original=inp.prompt, assistant_backend=refined and refined.get("backend"))
        return GenerateOutput(**out)

    @bentoml.api(input_spec=PictureInput)
    async def generate_png(self, **fields: Any) -> Image.Image:
        """Generate one image and return it as an image/png body; the seed and keyword are in X-Tipsen-* headers."""
        item = await self._generate(PictureInput(**fields))
        if isinstance(item, JSONResponse):
            return item
        meta = item.metadata
        return Response(base64.b64decode(item.images[0]), media_type="image/png",
                        headers={"X-Tipsen-Seed": str(meta.get("seed")), "X-Tipsen-Keyword": meta.get("keyword") or ""})

    @bentoml.api(input_spec=RefineInput)
    async def refine(self, **fields: Any) -> RefineOutput:
        """The Senior Prompting Assistant alone: a short (often Korean) prompt -> a validated English prompt."""
        if (unavailable := self._unavailable()) is not None:
            return unavailable
        inp = RefineInput(**fields)
        try:  # checked before the request waits for a slot or the device
            if inp.keyword:
                self.registry.get(inp.keyword)
        except ConfigError as exc:
            return error(400, str(exc))
        log.info("refine: prompt %s", shown(inp.prompt))
        if not self.slots.acquire():
            return error(429, BUSY)

        def work() -> Refinement:
            try:
                with self.gpu:
                    return self.assistant.refine(inp.prompt, keyword=inp.keyword, seed=inp.seed)
            finally:
                self.slots.release(1)

        try:
            return RefineOutput(**(await asyncio.to_thread(work)).model_dump())
        except ConfigError as exc:
            return error(400, str(exc))

    # ---------------------------------------------------------------- GET endpoints (FastAPI, in the OpenAPI doc)

    @ui.get("/keywords", response_model=KeywordsOut, responses=NOT_READY)
    async def keywords(self):
        """The bank: each adapter's names and whether it is available (with the reason if not)."""
        if (unavailable := self._unavailable()) is not None:
            return unavailable
        status = self.generator.status()
        known = self.registry.keywords
        rows = [KeywordOut(slug=slug, keyword=a["keyword"], ko=a["ko"], class_token=a["class_token"],
                           category=known[slug].category if slug in known else "unknown", available=a["available"],
                           reason=a.get("reason"), sha256=a.get("sha256"), loaded_at=a.get("loaded_at"),
                           path=a.get("path"))
                for slug, a in status["adapters"].items()]
        return KeywordsOut(base_model=status["base_model"], device=status["device"], max_keywords=GEN.max_keywords,
                           shapes={k: list(v) for k, v in self.generator.shapes().items()}, keywords=rows)

    @ui.post("/bank/reload", response_model=ReloadOut,
             responses={**NOT_READY, 403: {"model": ErrorOut, "description": "auth is off and the client is not on "
                                                                            "the loopback address"},
                        409: {"model": ErrorOut, "description": "another reload is running"}})
    async def reload_bank(self, request: Request):
        """Re-read the bank index (models/bank.json): new and changed adapters are read and verified beside the
        serving ones and swapped in between two diffusion batches; a refused one leaves its old version serving."""
        if (unavailable := self._unavailable()) is not None:
            return unavailable
        host = request.client.host if request.client else ""
        if not os.environ.get(API_KEY_ENV) and not is_loopback(host):  # with a key, the Guard has checked it
            return error(403, f"bank/reload: without a service key ({API_KEY_ENV}) only clients on the loopback "
                              "address may reload the bank")
        try:
            changes = await asyncio.to_thread(self.generator.reload)
        except RuntimeError as exc:
            return error(409, f"bank/reload: {exc}; retry when it has finished")
        return ReloadOut(**changes)

    @ui.get("/route", response_model=RouteOut,
            responses={**NOT_READY, 422: {"model": ErrorOut, "description": "a query parameter out of bounds"}})
    async def route(self, text: Annotated[str, Query(max_length=GEN.max_prompt_chars)] = ""):
        """The keyword a prompt would be drawn with (the web page's live hint)."""
        if (unavailable := self._unavailable()) is not None:
            return unavailable
        route = self.generator.route(text)
        adapter = self.generator.status()["adapters"].get(route.slug) if route.slug else None
        kw = self.registry[route.slug] if route.slug else None
        return RouteOut(slug=route.slug, keyword=kw and kw.keyword, ko=kw and kw.ko, matched=route.matched,
                        available=bool(adapter and adapter["available"]), source=route.source,
                        confidence=route.confidence, also=list(route.also), ask=list(route.ask))


PRIVATE = frozenset({"/generate_batch"})  # the service's own batch route: refused to clients, left out of /docs.json
Tipsen.add_asgi_middleware(PublicDocument, private=PRIVATE)
Tipsen.add_asgi_middleware(ErrorShape)
Tipsen.add_asgi_middleware(Guard, service=SVC, private=PRIVATE)
