//! tollgate: an AI agent gateway. See `docs/ARCHITECTURE.md` for the life of a request.
//!
//! # Layers
//!
//! The modules stand in six layers, and a module uses only modules of its own layer or of
//! layers below it (never above), with no circle anywhere. `tests/it/layers.rs` reads the
//! source tree and fails, naming the file and the name, when an import breaks this.
//!
//! | layer | modules | what it knows |
//! |---|---|---|
//! | core | clock, money, error, config, metrics, genmap, fault, records, tls, providers | units, records, errors, settings, what differs by provider kind: no I/O |
//! | store | db, store, wallet, envelope, outbox, audit, approval | SQL: keys, usage rows, the ledger, envelopes, the outbox, the audit chain, approvals |
//! | traffic | metering, hotwallet, holdbook, keys, limits, damping, loopguard, prices, estimate, upstream, toolroute, mcpclient, policy, mock | the writer that owns money, limits, providers and their health |
//! | state | state, ops | `AppState`, reload, the key cache refresh; the operations the CLI and admin API share |
//! | pipeline | proxy, routes, mcp | the request path: model calls, tool routes and MCP tool calls |
//! | server | server, admin, webhooks, conn | the router, the admin API, delivery, connections |
//!
//! The binary (`main.rs`, the CLI) sits above them all. Code under `#[cfg(test)]` may reach
//! upward: tests compose layers.

/// The layer table above, as the layer test reads it: (layer, modules), lowest first.
pub const LAYERS: &[(&str, &[&str])] = &[
    (
        "core",
        &[
            "clock",
            "money",
            "error",
            "config",
            "metrics",
            "otel",
            "genmap",
            "fault",
            "records",
            "redact",
            "tls",
            "h1client",
            "providers",
        ],
    ),
    (
        "store",
        &[
            "db",
            "store",
            "wallet",
            "envelope",
            "outbox",
            "audit",
            "approval",
            "analytics",
        ],
    ),
    (
        "traffic",
        &[
            "metering",
            "hotwallet",
            "holdbook",
            "keys",
            "limits",
            "damping",
            "cache",
            "cascade",
            "compress",
            "promptcache",
            "loopguard",
            "prices",
            "estimate",
            "upstream",
            "toolroute",
            "mcpclient",
            "policy",
            "mock",
        ],
    ),
    ("state", &["state", "ops", "focus", "reconcile"]),
    ("pipeline", &["proxy", "routes", "mcp"]),
    ("server", &["server", "admin", "ui", "webhooks", "conn"]),
];

pub mod admin;
pub mod analytics;
pub mod approval;
pub mod audit;
pub mod cache;
pub mod cascade;
pub mod clock;
pub mod compress;
pub mod config;
pub mod conn;
pub mod damping;
pub mod db;
pub mod envelope;
pub mod error;
pub mod estimate;
#[cfg(debug_assertions)]
#[doc(hidden)]
pub mod fault;
pub mod focus;
pub mod genmap;
pub mod h1client;
pub mod holdbook;
pub mod hotwallet;
pub mod keys;
pub mod limits;
pub mod loopguard;
pub mod mcp;
pub mod mcpclient;
pub mod metering;
pub mod metrics;
pub mod mock;
pub mod money;

pub mod ops;
pub mod otel;
pub mod outbox;
pub mod policy;
pub mod prices;
pub mod promptcache;
pub mod providers;
pub mod proxy;
pub mod reconcile;
pub mod records;
pub mod redact;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod toolroute;
pub mod ui;
pub mod upstream;
pub mod wallet;
pub mod webhooks;
