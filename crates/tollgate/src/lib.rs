//! tollgate: an AI agent gateway. See `docs/ARCHITECTURE.md` for the life of a request.

pub mod admin;
pub mod clock;
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
pub mod genmap;
pub mod hotwallet;
pub mod keys;
pub mod limits;
pub mod loopguard;
pub mod metering;
pub mod metrics;
pub mod mock;
pub mod money;
pub mod outbox;
pub mod prices;
pub mod proxy;
pub mod records;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod toolroute;
pub mod upstream;
pub mod wallet;
pub mod webhooks;
