//! TLS for outgoing connections (providers, tool services, webhooks).

/// Installs ring as rustls's crypto provider: the default one would pull in aws-lc-sys.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
