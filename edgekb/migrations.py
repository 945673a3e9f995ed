"""SQLite schema as an append-only list of migrations; never edit one that has shipped."""

from __future__ import annotations

import sqlite3

from .errors import SchemaTooNew

MIGRATIONS: list[str] = [
    # 1: documents and their chunks; vectors live beside the text so the index can be rebuilt.
    """
    CREATE TABLE documents (
        id INTEGER PRIMARY KEY,
        kb TEXT NOT NULL,
        path TEXT NOT NULL,
        title TEXT NOT NULL,
        format TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL,
        ingested_at REAL NOT NULL,
        UNIQUE (kb, path)
    );
    CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        ord INTEGER NOT NULL,
        heading TEXT NOT NULL,
        page INTEGER,
        text TEXT NOT NULL,
        token_count INTEGER NOT NULL,
        vector BLOB NOT NULL
    );
    CREATE INDEX chunks_doc ON chunks(doc_id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: keyword search. Porter-stemmed FTS5 for alphabetic scripts, trigram for CJK (the
    # default tokenizer does not segment Chinese). Triggers keep both in step with chunks,
    # inside the same transaction, cascade deletes included.
    """
    CREATE VIRTUAL TABLE chunks_fts USING fts5(
        title, heading, text, tokenize='porter unicode61 remove_diacritics 2');
    CREATE VIRTUAL TABLE chunks_trigram USING fts5(text, tokenize='trigram');
    INSERT INTO chunks_fts (rowid, title, heading, text)
        SELECT c.id, d.title, c.heading, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id;
    INSERT INTO chunks_trigram (rowid, text) SELECT id, text FROM chunks;
    CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, title, heading, text)
            SELECT new.id, d.title, new.heading, new.text FROM documents d WHERE d.id = new.doc_id;
        INSERT INTO chunks_trigram (rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
        DELETE FROM chunks_fts WHERE rowid = old.id;
        DELETE FROM chunks_trigram WHERE rowid = old.id;
    END;
    CREATE INDEX documents_kb ON documents(kb);
    """,
    # 3: conversations. A request's events are its replay log: resume reads them from here, so
    # RAM holds only live requests. Turns are what later prompts and `history` show.
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE requests (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        id TEXT NOT NULL,
        question TEXT NOT NULL,
        state TEXT NOT NULL,              -- running | done | cancelled | failed | interrupted
        last_seq INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        PRIMARY KEY (session_id, id)
    );
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (session_id, request_id, seq),
        FOREIGN KEY (session_id, request_id) REFERENCES requests(session_id, id)
            ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        request_id TEXT NOT NULL,
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        sources TEXT NOT NULL,            -- JSON list as sent in the sources event
        finish TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX turns_session ON turns(session_id, id);
    """,
    # 4: documents are published whole (store.py): a new version is written as `staging` in
    # small transactions beside the old one, then swapped in. UNIQUE(kb, path) becomes a
    # partial index over published documents, which needs the table rebuilt (SQLite's
    # documented procedure; foreign keys are off while migrating). The FTS triggers name the
    # table, so they are dropped and made again around the rebuild.
    """
    DROP TRIGGER chunks_ai;
    DROP TRIGGER chunks_ad;
    CREATE TABLE documents_new (
        id INTEGER PRIMARY KEY,
        kb TEXT NOT NULL,
        path TEXT NOT NULL,
        title TEXT NOT NULL,
        format TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL,
        ingested_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'ready'   -- staging | ready | retired
    );
    INSERT INTO documents_new (id, kb, path, title, format, sha256, size, chunk_count,
                               ingested_at)
        SELECT id, kb, path, title, format, sha256, size, chunk_count, ingested_at
        FROM documents;
    DROP TABLE documents;
    ALTER TABLE documents_new RENAME TO documents;
    CREATE UNIQUE INDEX documents_published ON documents(kb, path) WHERE state = 'ready';
    CREATE INDEX documents_kb ON documents(kb, state);
    CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, title, heading, text)
            SELECT new.id, d.title, new.heading, new.text FROM documents d WHERE d.id = new.doc_id;
        INSERT INTO chunks_trigram (rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
        DELETE FROM chunks_fts WHERE rowid = old.id;
        DELETE FROM chunks_trigram WHERE rowid = old.id;
    END;
    """,
    # 5: people who sign in on the web page (tokens for devices need no row).
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,               -- admin | user
        password TEXT NOT NULL,           -- scrypt$n$r$p$salt$hash
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 6: conversations get a name their user can change (NULL: the first question is shown).
    """
    ALTER TABLE sessions ADD COLUMN title TEXT;
    CREATE INDEX sessions_user ON sessions(user, updated_at);
    """,
]


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema up to date, one transaction per migration; refuse a newer one."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise SchemaTooNew(f"the data dir was written by a newer edgekb (schema {version}, "
                           f"this one knows {len(MIGRATIONS)}); upgrade edgekb or restore a "
                           "backup made by this version")
    if version == len(MIGRATIONS):
        return
    # Table rebuilds must not cascade: foreign keys are off while migrating (it cannot change
    # inside a transaction), and checked before they are turned back on.
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits first; the explicit BEGIN makes each step all-or-nothing.
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
        broken = conn.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise sqlite3.IntegrityError(f"foreign keys broken after migrating: {broken[:5]}")
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
