//! Virtual keys: generation, digests, and the in-memory cache the hot path reads.

use arc_swap::ArcSwap;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use crate::records::{pattern_matches, KeyLimits, KeyRecord, KeySecret, KeyStatus};

pub const KEY_PREFIX: &str = "tg_";
/// Characters of the secret shown by `keys list`: enough to tell keys apart, far too few to
/// guess the rest (the secret carries 192 random bits).
const SHOWN_PREFIX_LEN: usize = 10;

/// The server secret under which key digests are computed. A stolen database alone does
/// not let anyone test guesses offline.
#[derive(Clone)]
pub struct ServerSecret([u8; 32]);

impl ServerSecret {
    /// `TOLLGATE_SECRET` if given (any string; hashed to 32 bytes), else `<data_dir>/secret`,
    /// created with 256 random bits and mode 0600 on first use.
    pub fn load(data_dir: &Path, env_value: Option<String>) -> std::io::Result<ServerSecret> {
        if let Some(v) = env_value.filter(|v| !v.is_empty()) {
            use sha2::Digest;
            return Ok(ServerSecret(Sha256::digest(v.as_bytes()).into()));
        }
        let path = data_dir.join("secret");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let raw = hex::decode(text.trim())
                    .map_err(|_| std::io::Error::other(format!("{} is not hex", path.display())))?;
                let arr: [u8; 32] = raw.try_into().map_err(|_| {
                    std::io::Error::other(format!("{} must hold 32 bytes of hex", path.display()))
                })?;
                Ok(ServerSecret(arr))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                let mut arr = [0u8; 32];
                rand::rng().fill_bytes(&mut arr);
                write_private(&path, hex::encode(arr).as_bytes())?;
                Ok(ServerSecret(arr))
            }
            Err(e) => Err(e),
        }
    }

    pub fn digest(&self, key: &str) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(bytes)
}

/// A fresh secret: `tg_` and 24 random bytes in URL-safe base64.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn shown_prefix(secret: &str) -> String {
    secret.chars().take(SHOWN_PREFIX_LEN).collect()
}

pub fn generate_id() -> String {
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    format!("key_{}", hex::encode(bytes))
}

/// Digest → key, swapped whole whenever the store's key revision moves. Reads are a pointer
/// load and a hash lookup; no lock, no database.
#[derive(Default)]
pub struct KeyCache {
    map: ArcSwap<HashMap<[u8; 32], Arc<KeyRecord>>>,
    /// Team name → its limit overrides; teams without a row use the `[limits.team]` defaults.
    teams: ArcSwap<HashMap<String, KeyLimits>>,
    /// (owner kind, owner) → wallet id.
    wallets: ArcSwap<HashMap<(crate::wallet::OwnerKind, String), String>>,
    /// Scope (`key:ID`, `team:NAME`, `org:NAME`) → its budgets.
    budgets: ArcSwap<HashMap<String, Vec<crate::envelope::Budget>>>,
    rev: std::sync::atomic::AtomicI64,
}

impl KeyCache {
    pub fn new() -> Self {
        KeyCache {
            map: ArcSwap::from_pointee(HashMap::new()),
            teams: ArcSwap::from_pointee(HashMap::new()),
            wallets: ArcSwap::from_pointee(HashMap::new()),
            budgets: ArcSwap::from_pointee(HashMap::new()),
            rev: std::sync::atomic::AtomicI64::new(-1),
        }
    }

    pub fn get(&self, digest: &[u8; 32]) -> Option<Arc<KeyRecord>> {
        self.map.load().get(digest).cloned()
    }

    /// The key with this id: a scan, for the few callers that hold an id, not a secret
    /// (dashboard sessions).
    pub fn by_id(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.map.load().values().find(|k| k.id == id).cloned()
    }

    pub fn team_limits(&self, team: &str) -> Option<KeyLimits> {
        self.teams.load().get(team).copied()
    }

    /// The wallet a key draws on: its own, else its team's, else its org's (`default` when
    /// the key names none).
    pub fn wallet_for(&self, key: &KeyRecord) -> Option<String> {
        use crate::wallet::OwnerKind;
        let w = self.wallets.load();
        if w.is_empty() {
            return None;
        }
        let get = |kind: OwnerKind, owner: &str| w.get(&(kind, owner.to_string())).cloned();
        get(OwnerKind::Key, &key.id)
            .or_else(|| key.team.as_deref().and_then(|t| get(OwnerKind::Team, t)))
            .or_else(|| get(OwnerKind::Org, key.org.as_deref().unwrap_or("default")))
    }

    /// The budgets that apply to a key: its own, its team's, its org's.
    pub fn budgets_for(&self, key: &KeyRecord) -> Vec<crate::envelope::Budget> {
        let b = self.budgets.load();
        if b.is_empty() {
            return Vec::new();
        }
        let mut scopes = vec![format!("key:{}", key.id)];
        if let Some(t) = &key.team {
            scopes.push(format!("team:{t}"));
        }
        scopes.push(format!("org:{}", key.org.as_deref().unwrap_or("default")));
        scopes
            .iter()
            .filter_map(|s| b.get(s))
            .flatten()
            .cloned()
            .collect()
    }

    pub fn replace(&self, snap: crate::store::KeySnapshot) {
        let rev = snap.rev;
        let map = snap
            .keys
            .into_iter()
            .map(|(d, k)| (d, Arc::new(k)))
            .collect();
        self.map.store(Arc::new(map));
        self.teams.store(Arc::new(
            snap.teams.into_iter().map(|t| (t.name, t.limits)).collect(),
        ));
        let mut budgets: HashMap<String, Vec<crate::envelope::Budget>> = HashMap::new();
        for b in snap.budgets {
            budgets.entry(b.scope.clone()).or_default().push(b);
        }
        self.budgets.store(Arc::new(budgets));
        self.wallets.store(Arc::new(
            snap.wallets
                .into_iter()
                .map(|(kind, owner, id)| ((kind, owner), id))
                .collect(),
        ));
        self.rev.store(rev, std::sync::atomic::Ordering::Release);
    }

    pub fn rev(&self) -> i64 {
        self.rev.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn secrets_are_long_and_distinct() {
        let a = generate_secret();
        let b = generate_secret();
        assert!(a.starts_with("tg_"));
        assert_eq!(a.len(), 3 + 32);
        assert_ne!(a, b);
    }

    #[test]
    fn digest_depends_on_the_server_secret() {
        let dir = std::env::temp_dir().join(format!("tg-secret-{}", generate_id()));
        let s1 = ServerSecret::load(&dir, None).unwrap();
        let s1_again = ServerSecret::load(&dir, None).unwrap();
        let s2 = ServerSecret::load(&dir, Some("other".into())).unwrap();
        assert_eq!(s1.digest("tg_x"), s1_again.digest("tg_x"));
        assert_ne!(s1.digest("tg_x"), s2.digest("tg_x"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn model_patterns() {
        let mut k = KeyRecord {
            id: "k".into(),
            name: "a".into(),
            team: None,
            project: None,
            models: vec![],
            tools: Vec::new(),
            tags: BTreeMap::new(),
            admin: false,
            viewer: false,
            prefix: "tg_".into(),
            created_ms: 0,
            expires_ms: Some(100),
            revoked_ms: None,
            rotated_from: None,
            limits: KeyLimits::default(),
            org: None,
            secrets: Vec::new(),
        };
        assert!(k.allows_model("anything"));
        k.models = vec!["gpt-4o".into(), "mock*".into()];
        assert!(k.allows_model("gpt-4o"));
        assert!(!k.allows_model("gpt-4o-mini"));
        assert!(k.allows_model("mock-slow"));
        assert_eq!(k.status_at(99), KeyStatus::Active);
        assert_eq!(k.status_at(100), KeyStatus::Expired);
        k.revoked_ms = Some(50);
        assert_eq!(k.status_at(99), KeyStatus::Revoked);
    }
}
