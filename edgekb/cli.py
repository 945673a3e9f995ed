"""edgekb: a knowledge-base question-answering appliance.

Command line: argument parsing and output only; the work is done by the modules it calls.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from . import __version__, security_cli
from .errors import EdgekbError

DEMO_DIR = Path(__file__).with_name("demo")
EXIT_USAGE = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file (default: $EDGEKB_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="where the database, index and models live")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set retrieval.k=6")
    # Also after the command; SUPPRESS keeps a value given before it.
    parser.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--log-format", choices=("human", "json"), default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


EXAMPLES = {
    "edgekb": """examples:
  edgekb ingest --demo                      the bundled demo manuals
  edgekb serve                              the page at http://127.0.0.1:8080/
  edgekb ask "How do I reset the pump?"     an answer in the terminal
  edgekb COMMAND --help                     what each command takes""",
    "serve": """examples:
  edgekb serve
  edgekb serve --host 0.0.0.0 --port 8080 --config /etc/edgekb/edgekb.yaml""",
    "ingest": """examples:
  edgekb ingest ~/manuals                    add new files, update changed ones, drop deleted
  edgekb ingest line3-pump.pdf --kb line-3   into the knowledge base line-3
  edgekb ingest --demo""",
    "reindex": """examples:
  edgekb reindex                             every knowledge base, after changing the embedder
  edgekb reindex --kb line-3""",
    "search": """examples:
  edgekb search "overpressure trip"
  edgekb search "E-204" --kb line-3 --mode keyword --json""",
    "ask": """examples:
  edgekb ask "How do I reset the pump after an overpressure trip?"
  edgekb ask "and the seal?" --session=Xb3...   a follow-up in the same conversation
  edgekb ask "E-204?" --kb line-3 --url ws://10.0.0.5:8080/ws
  edgekb ask "..." --config /etc/edgekb/edgekb.yaml   the server named in those settings
Ctrl-C stops the answer on the appliance too; a second Ctrl-C quits at once.""",
    "models": """examples:
  edgekb models list
  edgekb models fetch                        the configured LLM and embedder""",
    "config": """examples:
  edgekb config check --config edgekb.yaml
  edgekb config show --set server.port=8081""",
}


def _sub(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, epilog=EXAMPLES.get(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgekb", description=__doc__.split("\n")[0],
                                     epilog=EXAMPLES["edgekb"],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgekb {__version__}")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default: logging.level)")
    parser.add_argument("--log-format", choices=("human", "json"),
                        help="one line per event, for people or as JSON (default: logging.format)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = _sub(sub, "serve", help="run the appliance")
    _common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    ingest = _sub(sub, "ingest", help="add files or folders to the knowledge base")
    _common(ingest)
    ingest.add_argument("paths", nargs="*", type=Path)
    ingest.add_argument("--demo", action="store_true", help="ingest the bundled demo manuals")
    ingest.add_argument("--kb", default="default", help="knowledge base (default: default)")

    reindex = _sub(sub, "reindex", help="embed every stored chunk again (after changing "
                             "the embedder); the server must be stopped")
    _common(reindex)
    reindex.add_argument("--kb", action="append", help="knowledge base(s) (default: all)")

    search = _sub(sub, "search", help="show the chunks retrieval finds, without the LLM")
    _common(search)
    search.add_argument("query")
    search.add_argument("--kb", action="append", help="knowledge base(s) to search (default: all)")
    search.add_argument("--k", type=int, default=5)
    search.add_argument("--mode", choices=("hybrid", "vector", "keyword"), default="hybrid")
    search.add_argument("--json", action="store_true", help="one JSON object per chunk per line")

    ask = _sub(sub, "ask", help="ask a running server a question")
    _common(ask)
    ask.add_argument("question")
    ask.add_argument("--url", help="the server's WebSocket, ws://HOST:PORT/ws (default: from "
                     "the settings' server.host and server.port)")
    ask.add_argument("--session", help="continue this conversation (its id is printed after "
                     "each answer)")
    ask.add_argument("--kb", action="append", help="knowledge base(s) to search (default: all)")
    ask.add_argument("--json", action="store_true", help="print every event as one JSON line")
    ask.add_argument("--token", help="a token from `edgekb token issue` (default: $EDGEKB_TOKEN)")
    ask.add_argument("--cafile", help="CA or self-signed certificate to trust for wss://")

    models = _sub(sub, "models", help="list or fetch the models of models.toml")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="each model and whether it is verified")
    _common(listing)
    fetch = models_sub.add_parser("fetch", help="download and verify models into the cache")
    _common(fetch)
    fetch.add_argument("names", nargs="*", help="default: the configured LLM and embedder")
    fetch.add_argument("--force", action="store_true", help="fetch again even if verified")

    backup = _sub(sub, "backup", help="write a consistent archive of the data dir (also"
                            " while the server runs)")
    _common(backup)
    backup.add_argument("file", type=Path, help="the archive to write (.tar, or .tar.gz)")

    restore = _sub(sub, "restore", help="restore an archive into an empty data dir")
    _common(restore)
    restore.add_argument("file", type=Path, help="an archive written by edgekb backup")

    doctor = _sub(sub, "doctor", help="check settings, models, database, index, disk,"
                            " clock and permissions; say what to fix")
    _common(doctor)
    doctor.add_argument("--json", action="store_true", help="one JSON object per finding")

    config = _sub(sub, "config", help="check or show the effective settings")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _common(config_sub.add_parser("check", help="validate settings, report every problem"))
    _common(config_sub.add_parser("show", help="print the effective settings as YAML"))
    security_cli.add_commands(sub, _common)
    return parser


def _settings(args: argparse.Namespace) -> Any:
    from .config import load_settings, parse_set_option

    overrides: dict[str, Any] = dict(parse_set_option(item) for item in args.set)
    overrides["data_dir"] = args.data_dir
    overrides["server.host"] = getattr(args, "host", None)
    overrides["server.port"] = getattr(args, "port", None)
    overrides["logging.level"] = args.log_level
    overrides["logging.format"] = args.log_format
    settings = load_settings(args.config, overrides=overrides)
    _setup_logging(settings)
    return settings


def _setup_logging(settings: Any) -> None:
    from .logs import setup

    log = settings.logging
    setup(log.level, log.format, settings.log_file, log.file_max_mb, log.file_backups)


def main(argv: list[str] | None = None) -> int:
    from .logs import setup

    args = build_parser().parse_args(argv)
    # Until the settings are read (and for commands without settings): flags or defaults.
    setup(args.log_level or "WARNING", args.log_format or "human")
    try:
        return COMMANDS[args.command](args)
    except EdgekbError as exc:
        print(f"edgekb: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    asyncio.run(serve(_settings(args)))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from .backup import before_migrating
    from .datadir import exclusive
    from .engines import load_embedder, make_ingestor, open_catalog, open_library
    from .ingest import expand_paths
    from .progress import FileProgress
    from .store import Store, check_kb_name

    settings = _settings(args)
    paths = list(args.paths) + ([DEMO_DIR] if args.demo else [])
    if not paths:
        print("edgekb ingest: name files or folders, or --demo", file=sys.stderr)
        return EXIT_USAGE
    check_kb_name(args.kb)
    with exclusive(settings.data_dir, "edgekb ingest"):
        before_migrating(settings, settings.storage.min_free_mb)
        embedder = load_embedder(settings, open_catalog(settings))
        store = Store(settings.db_path)
        try:
            store.purge_unpublished()
            library = open_library(settings, embedder)
            ingestor = make_ingestor(settings, store, embedder, library)
            library.get(args.kb).load_or_rebuild(store, ingestor.write)
            progress = FileProgress(files=sum(1 for _ in expand_paths(paths)))
            ingestor.on_progress = progress
            report = ingestor.ingest(paths, args.kb,
                                     on_file=lambda r: progress.result(_file_result(r)))
        finally:
            store.close()
    print(f"{report.count('added')} added, {report.count('updated')} updated, "
          f"{report.count('unchanged')} unchanged, {report.count('removed')} removed, "
          f"{report.count('failed')} failed; {report.chunks} chunks in these files, "
          f"{len(library.get(args.kb))} in knowledge base {args.kb!r}", file=sys.stderr)
    return 1 if report.count("failed") else 0


def _file_result(result: Any) -> str:
    detail = f"{result.chunks} chunks" if result.status != "failed" else \
        f"[{result.code}] {result.error}"
    return f"{result.status:>9}  {result.path}  ({detail})"


def cmd_reindex(args: argparse.Namespace) -> int:
    from .backup import before_migrating
    from .datadir import exclusive
    from .engines import load_embedder, make_ingestor, open_catalog, open_library
    from .store import Store, check_kb_name

    settings = _settings(args)
    with exclusive(settings.data_dir, "edgekb reindex"):
        before_migrating(settings, settings.storage.min_free_mb)
        embedder = load_embedder(settings, open_catalog(settings))
        store = Store(settings.db_path)
        try:
            ingestor = make_ingestor(settings, store, embedder, open_library(settings, embedder))
            kbs = _known_kbs(store, [check_kb_name(kb) for kb in args.kb]) if args.kb \
                else store.kbs()
            if not kbs:
                print("edgekb reindex: the data dir holds no knowledge base", file=sys.stderr)
                return 1
            for kb in kbs:
                count = ingestor.reembed(kb)
                print(f"{kb}: {count} chunks embedded with {embedder.identity}", file=sys.stderr)
        finally:
            store.close()
    return 0


def _known_kbs(store: Any, kbs: list[str] | None) -> list[str] | None:
    """``kbs`` when the data dir holds each of them, else a typed not_found."""
    from .errors import NotFound

    known = store.kbs()
    for kb in kbs or []:
        if kb not in known:
            raise NotFound(f"no knowledge base {kb!r} (the data dir holds "
                           f"{', '.join(known) or 'none'})")
    return kbs


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from .answer import source_entry
    from .engines import load_embedder, open_catalog, open_library
    from .retrieval import Searcher
    from .store import Store, check_kb_name

    settings = _settings(args)
    kbs = [check_kb_name(kb) for kb in args.kb] if args.kb else None
    embedder = load_embedder(settings, open_catalog(settings))
    library = open_library(settings, embedder)
    store = Store(settings.db_path)
    try:
        _known_kbs(store, kbs)
        # Read-only use of a copy in memory: never rewrites index files a server may own.
        for kb in kbs or store.kbs():
            library.get(kb).load_or_rebuild(store)
        hits = Searcher(embedder, library).search(store, args.query, args.k, kbs, args.mode)
    finally:
        store.close()
    for number, scored in enumerate(hits, start=1):
        entry = source_entry(number, scored, args.query)
        if args.json:
            print(json.dumps({**entry, "kb": scored.hit.kb, "chunk": scored.hit.id,
                              "text": scored.hit.text}, ensure_ascii=False))
        else:
            where = f" · {entry['where']}" if entry["where"] else ""
            print(f"[{number}] {entry['score']:.3f}  {entry['doc']}{where}  ({scored.hit.kb})")
            print("    " + scored.hit.text.replace("\n", "\n    ") + "\n")
    if not hits and not args.json:
        print("no matching chunks", file=sys.stderr)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .client import AnswerPrinter, Asker, BadUrl, json_printer
    from .store import check_kb_name

    url = args.url or _server_url(_settings(args))
    kbs = [check_kb_name(kb) for kb in args.kb] if args.kb else None
    emit = json_printer(sys.stdout) if args.json else AnswerPrinter(sys.stdout, sys.stderr)
    token = security_cli.token_from_env(args.token)
    try:
        asker = Asker(url, args.question, emit, session=args.session, kbs=kbs,
                      token=token, cafile=args.cafile)
    except BadUrl as exc:
        print(f"edgekb ask: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def interrupted() -> None:  # the first Ctrl-C stops the answer, the second quits
            if not asker.interrupt():
                task.cancel()

        loop.add_signal_handler(signal.SIGINT, interrupted)
        try:
            return await asker.run()
        except asyncio.CancelledError:
            return 130
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(run())


def _server_url(settings: Any) -> str:
    """The WebSocket of the server these settings describe (a wildcard host: this machine;
    wss:// when they serve TLS)."""
    host = settings.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    host = f"[{host}]" if ":" in host else host
    scheme = "wss" if settings.tls.certificate else "ws"
    return f"{scheme}://{host}:{settings.server.port}/ws"


def cmd_models(args: argparse.Namespace) -> int:
    from .boards import llm_name
    from .catalog import fetch, file_state
    from .engines import open_catalog
    from .progress import ProgressBar

    settings = _settings(args)
    catalog = open_catalog(settings)
    cache = settings.models_cache
    if args.models_command == "list":
        configured = {llm_name(settings), settings.models.embedder}
        for entry in catalog.entries.values():
            states = {file_state(cache, entry, f) for f in entry.files}
            state = "verified" if states == {"verified"} else \
                "corrupt" if "corrupt" in states else "missing"
            mark = "*" if entry.name in configured else " "
            print(f"{mark} {entry.name:<18} {entry.kind:<9} {state:<9} {entry.description}")
        print(f"cache: {cache}   (* = configured)")
        return 0
    names = args.names or [llm_name(settings), settings.models.embedder]
    entries = [catalog.get(name) for name in names]  # every name checked before any download
    with ProgressBar() as bar:
        for entry in entries:
            fetch(cache, entry, progress=bar, force=args.force)
    for entry in entries:
        print(f"{entry.name}: verified in {cache / entry.name}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from .backup import create_backup

    settings = _settings(args)
    report = create_backup(settings, args.file, settings.storage.min_free_mb)
    counts = ", ".join(f"{n} {table}" for table, n in report.counts.items())
    print(f"backup written: {report.path} ({report.size / 1e6:.1f} MB, database schema"
          f" {report.schema_version}: {counts}; {report.files} files;"
          f" {report.seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .backup import restore_backup

    settings = _settings(args)
    report = restore_backup(settings, args.file, settings.storage.min_free_mb)
    counts = ", ".join(f"{n} {table}" for table, n in report.counts.items())
    indexes = ", ".join(f"{kb}: {n} vectors" for kb, n in report.indexes.items()) or "none"
    print(f"restored into {report.data_dir}: database schema {report.schema_version}"
          f" ({counts}), {report.files} files; indexes rebuilt ({indexes})", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from .doctor import examine, ok, problem
    from .errors import ConfigError

    try:
        settings = _settings(args)
    except ConfigError as exc:
        findings = [problem("config", exc.message, "edgekb config check shows each problem;"
                            " fix them in the config file or the EDGEKB_* variables")]
    else:
        findings = [ok("config", "settings are valid"), *examine(settings)]
    for finding in findings:
        if args.json:
            print(json.dumps(finding.to_json(), ensure_ascii=False))
            continue
        label = {"ok": "ok", "warning": "warning", "problem": "PROBLEM"}[finding.level]
        print(f"{label:<8} {finding.check:<12} {finding.message}")
        if finding.fix:
            print(f"{'':<21} fix: {finding.fix}")
    problems = sum(f.level == "problem" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"edgekb doctor: {problems} problem(s), {warnings} warning(s)", file=sys.stderr)
    return 1 if problems else 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import settings_to_yaml

    settings = _settings(args)
    if args.config_command == "show":
        print(settings_to_yaml(settings), end="")
    else:
        print("configuration is valid", file=sys.stderr)
    return 0


COMMANDS = {"serve": cmd_serve, "ingest": cmd_ingest, "reindex": cmd_reindex,
            "search": cmd_search, "ask": cmd_ask, "models": cmd_models, "config": cmd_config,
            "backup": cmd_backup, "restore": cmd_restore, "doctor": cmd_doctor,
            "users": lambda args: security_cli.cmd_users(args, _settings(args)),
            "token": lambda args: security_cli.cmd_token(args, _settings(args)),
            "tls": lambda args: security_cli.cmd_tls(args, _settings(args)),
            "audit": lambda args: security_cli.cmd_audit(args, _settings(args))}
