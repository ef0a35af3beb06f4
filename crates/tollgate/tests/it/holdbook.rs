//! Holds decided in the gateway's memory (`[wallets] backend = "memory"`, ADR 0036): the same
//! books as holds in the store, and a store no other gateway may share.

use crate::harness::*;
use crate::wallets;
use tollgate::config::Config;
use tollgate::server::{Gateway, ServeOptions};

/// Every wallet scenario, unchanged, with holds decided in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_scenarios_behave_identically_with_holds_in_memory() {
    wallets::every_scenario_on(&TestStore::SqliteMemory).await;
}

async fn second_gateway(config: &str, dir: &std::path::Path) -> anyhow::Result<Gateway> {
    let mut cfg = Config::from_toml(config).unwrap();
    cfg.server.data_dir = dir.to_path_buf();
    Gateway::start(ServeOptions {
        config: cfg,
        config_path: None,
        listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        admin_key: Some(ADMIN_KEY.into()),
        secret: None,
        provider_keys: Default::default(),
    })
    .await
}

/// A gateway deciding holds in memory has its SQLite file to itself: a second gateway on it
/// is refused, whichever of the two modes either runs, with a message that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_in_memory_need_the_store_to_themselves() {
    let memory = TestStore::SqliteMemory.config("");
    let gw = TestGateway::start(&memory).await;
    let refused = |config: String, dir: std::path::PathBuf, why: &'static str| async move {
        let err = second_gateway(&config, &dir).await.err().expect("refused");
        assert!(err.to_string().contains(why), "{err:#}");
    };
    refused(
        String::new(),
        gw.dir.path().into(),
        "backend = \"memory\" serves",
    )
    .await;
    refused(
        memory.clone(),
        gw.dir.path().into(),
        "another gateway serves",
    )
    .await;
    let shared = TestGateway::start("").await;
    refused(
        memory.clone(),
        shared.dir.path().into(),
        "another gateway serves",
    )
    .await;
    // Gateways sharing a file in the store's mode still may.
    let again = second_gateway("", shared.dir.path()).await;
    assert!(again.is_ok(), "{:#}", again.err().unwrap());

    let problems = Config::from_toml(
        "[store]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n[wallets]\nbackend = \"memory\"\n",
    )
    .unwrap()
    .validate();
    assert!(
        problems.iter().any(|p| p.contains("needs a SQLite store")),
        "{problems:?}"
    );
}
