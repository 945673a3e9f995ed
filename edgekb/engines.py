"""Build the engines from settings: verified model files in, loaded engines out (blocking).

Shared by the server's start-up and the CLI, so both refuse a missing or corrupt model the same
way: every file is checked against its sha256 before it is loaded, and models are never fetched
here (a missing one names the fetch command).
"""

from __future__ import annotations

from collections.abc import Callable

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .boards import llm_name
from .catalog import Catalog, ModelEntry, default_manifest_path, verify
from .config import Settings
from .embed import Embedder
from .index import Library, Write
from .ingest import Ingestor
from .llm import LlmEngine
from .llm_remote import RemoteLlm
from .prompt import PromptBuilder
from .store import Store

# Room kept free in the context after the prompt and the answer, for the chat template's own
# tokens and rounding in the budget.
CONTEXT_MARGIN = 16
# Sampling settings a models.toml entry may carry; they go with every prompt to the LLM.
SAMPLING_KEYS = ("repeat_penalty", "presence_penalty", "frequency_penalty", "top_k", "top_p",
                 "min_p")


def open_catalog(settings: Settings) -> Catalog:
    return Catalog.load(settings.manifest_path or default_manifest_path())


def embedder_identity(entry: ModelEntry) -> str:
    """What an index records of the model its vectors come from: its name and file hash."""
    model = next(f for f in entry.files if f.role == "model")
    return f"{entry.name} (sha256 {model.sha256[:16]})"


def load_embedder(settings: Settings, catalog: Catalog) -> Embedder:
    entry = catalog.get(settings.models.embedder, kind="embedder")
    paths = verify(settings.models_cache, entry)
    return Embedder(paths["model"], paths["tokenizer"], dim=int(entry.settings["dim"]),
                    max_tokens=int(entry.settings.get("max_tokens", 256)),
                    threads=settings.embedding.threads, batch_size=settings.embedding.batch_size,
                    identity=embedder_identity(entry))


def open_library(settings: Settings, embedder: Embedder) -> Library:
    return Library(embedder.dim, settings.data_dir, embedder.identity)


def make_ingestor(settings: Settings, store: Store, embedder: Embedder,
                  library: Library, write: Write | None = None) -> Ingestor:
    return Ingestor(store, embedder, library, chunk_tokens=settings.chunking.chunk_tokens,
                    overlap_tokens=settings.chunking.overlap_tokens,
                    max_file_bytes=settings.ingest.max_file_mb * 1024 * 1024, write=write)


def load_llm(settings: Settings, catalog: Catalog) -> tuple[LlmEngine | RemoteLlm, ModelEntry]:
    entry = catalog.get(llm_name(settings), kind="llm")
    gen = settings.generation
    if "endpoint" in entry.settings:
        return RemoteLlm(str(entry.settings["endpoint"]), str(entry.settings.get("model", "")),
                         n_ctx=int(entry.settings.get("n_ctx", 4096)),
                         prompt_format=str(entry.settings.get("prompt_format", "completion")),
                         seed=gen.seed,
                         flush_interval_s=settings.server.flush_interval_ms / 1000), entry
    paths = verify(settings.models_cache, entry)
    engine = LlmEngine(paths["model"], n_ctx=int(entry.settings.get("n_ctx", 2048)),
                       threads=gen.threads, n_batch=gen.n_batch, seed=gen.seed,
                       state_cache_bytes=gen.state_cache_mb * 1024 * 1024, slots=gen.slots,
                       flush_interval_s=settings.server.flush_interval_ms / 1000)
    return engine, entry


ChatTemplate = tuple[Callable[[list[dict[str, str]]], str], list[str]]  # render, its stops


def prompt_builder(settings: Settings, llm: LlmEngine | RemoteLlm, entry: ModelEntry,
                   chat: ChatTemplate | None = None) -> PromptBuilder:
    """``chat``: the model's chat template when the caller has it from elsewhere (the bench's
    raw llama-cpp-python side); else it is read from a local model's GGUF metadata."""
    fmt = str(entry.settings.get("prompt_format", "completion"))
    stop = [str(s) for s in entry.settings.get("stop", [])]
    template: Callable[[list[dict[str, str]]], str] | None = None
    if fmt == "chat" and chat is None and isinstance(llm, LlmEngine):
        # A remote server applies its own.
        chat = chat_template(llm.metadata("tokenizer.chat_template"),
                             llm.model.piece(llm.model.eos, special=True).decode(errors="ignore"),
                             llm.model.piece(llm.model.bos, special=True).decode(errors="ignore"))
    if fmt == "chat" and chat is not None:
        template, template_stop = chat
        stop.extend(template_stop)
    budget = llm.n_ctx - settings.generation.max_tokens - CONTEXT_MARGIN
    sampling = {key: entry.settings[key] for key in SAMPLING_KEYS if key in entry.settings}
    return PromptBuilder(fmt, llm.count_tokens, budget, stop, template, sampling,
                         worked_example=bool(entry.settings.get("worked_example", False)))


def chat_template(source: str | None, eos: str, bos: str) -> ChatTemplate:
    """A GGUF chat template (Jinja), rendered as llama.cpp does, and its end-of-turn stop."""
    if not source:
        raise ValueError("prompt_format 'chat' needs a chat template in the GGUF metadata")
    formatter = Jinja2ChatFormatter(source, eos_token=eos, bos_token=bos)

    def render(messages: list[dict[str, str]]) -> str:
        return formatter(messages=messages).prompt

    return render, [eos] if eos else []
