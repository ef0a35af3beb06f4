//! The `tollgate` command line, apart from `serve` (in `main.rs`).

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use tollgate::admin::{self, CreatedKey, KeyView, NewKey};
use tollgate::config::parse_duration;
use tollgate::keys::KeyLimits;
use tollgate::keys::ServerSecret;
use tollgate::store::{ReportRow, Store, TeamRecord};

mod args;
mod backend;
mod commands;
mod print;

pub(crate) use args::*;
pub(crate) use backend::*;
pub(crate) use commands::*;
pub(crate) use print::*;
