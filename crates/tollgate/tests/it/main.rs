#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end tests: a real gateway on loopback, real SQLite and PostgreSQL, the mock provider speaking
//! OpenAI's wire format over real HTTP.

mod harness;

mod holdbook;
mod hotwallets;
mod layers;

mod agents;
mod auth;
mod cache;
mod cascade;
mod cli;
mod clickhouse;
mod clients;
mod compression;
mod connections;
mod corpus;
mod damping;
mod hardening;
mod limits;
mod loopguard;
mod mcp;
mod messages;
mod metering;
mod otel;
mod postgres;
mod promptcache;
mod redaction;
mod redis;
mod responses;
mod routes;
mod routing;
mod shutdown;
mod spend;
mod streaming;
mod toolcalls;
mod translation;
mod ui;
mod upstream_conns;
mod wallets;
