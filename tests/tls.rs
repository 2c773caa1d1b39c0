//! TLS on the listener (h1 and h2 by ALPN), mTLS, certificate hot reload, and upstreams behind
//! TLS with an extra CA.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use fuke::devcerts;
use fuke::server::Transport;
use fuke::tls::{CertStore, server_config};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls_pki_types::pem::PemObject;
use support::*;

fn write_certs(dir: &Path) -> devcerts::DevCerts {
    let certs = devcerts::generate(&["localhost", "127.0.0.1"]).unwrap();
    devcerts::write(dir, &certs).unwrap();
    certs
}

fn client_config(
    cas: &[&str],
    client: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let b = rustls::ClientConfig::builder_with_provider(fuke::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Full handshakes only: a resumed session would not show the server's current certificate.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// One request over a fresh TLS connection; returns the status, the negotiated ALPN and the
/// server's leaf certificate.
async fn tls_request(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(StatusCode, Option<Vec<u8>>, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
    let leaf = conn.peer_certificates().unwrap()[0].to_vec();
    let req = Request::builder()
        .uri(format!("https://localhost{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let io = TokioIo::new(tls);
    let status = if alpn.as_deref() == Some(b"h2") {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        status_of(send.send_request(req).await).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        status_of(send.send_request(req).await).await?
    };
    Ok((status, alpn, leaf))
}

/// The status of a response, once its body has been read to the end.
async fn status_of(
    resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<StatusCode, String> {
    let resp = resp.map_err(|e| e.to_string())?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

async fn tls_gateway(dir: &Path, mtls: bool) -> (Gateway, Arc<CertStore>) {
    let up = Upstream::start().await;
    let store =
        Arc::new(CertStore::open(&dir.join("server.pem"), &dir.join("server.key")).unwrap());
    let ca = dir.join("ca.pem");
    let cfg = server_config(store.clone(), mtls.then_some(ca.as_path())).unwrap();
    let gw = Gateway::start_with(
        &policy_yaml(&up.base_url()),
        Options {
            transport: Transport::Tls(cfg),
            ..Default::default()
        },
    )
    .await;
    (gw, store)
}

#[tokio::test]
async fn tls_serves_h2_and_http1_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let (gw, _) = tls_gateway(dir.path(), false).await;
    let (s, alpn, _) = tls_request(
        gw.addr,
        client_config(&[&certs.ca_cert], None, &[b"h2", b"http/1.1"]),
        "/healthz",
    )
    .await
    .unwrap();
    assert_eq!((s, alpn.as_deref()), (StatusCode::OK, Some(&b"h2"[..])));
    let (s, alpn, _) = tls_request(
        gw.addr,
        client_config(&[&certs.ca_cert], None, &[b"http/1.1"]),
        "/healthz",
    )
    .await
    .unwrap();
    assert_eq!(
        (s, alpn.as_deref()),
        (StatusCode::OK, Some(&b"http/1.1"[..]))
    );
    // A client that does not trust the CA gets no connection.
    let other = devcerts::generate(&["localhost"]).unwrap();
    assert!(
        tls_request(
            gw.addr,
            client_config(&[&other.ca_cert], None, &[]),
            "/healthz"
        )
        .await
        .is_err()
    );
    // Plain HTTP to a TLS listener gets nothing usable.
    let c = client();
    let plain = c
        .request(
            Request::get(gw.url("/healthz"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);
}

#[tokio::test]
async fn mtls_rejects_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let (gw, _) = tls_gateway(dir.path(), true).await;
    let no_cert = tls_request(
        gw.addr,
        client_config(&[&certs.ca_cert], None, &[b"http/1.1"]),
        "/healthz",
    )
    .await;
    assert!(no_cert.is_err(), "served a client without a certificate");
    // A certificate from another CA is refused too.
    let other = devcerts::generate(&["localhost"]).unwrap();
    let wrong = tls_request(
        gw.addr,
        client_config(
            &[&certs.ca_cert],
            Some((&other.client_cert, &other.client_key)),
            &[b"http/1.1"],
        ),
        "/healthz",
    )
    .await;
    assert!(wrong.is_err(), "served a client with a foreign certificate");
    let (s, _, _) = tls_request(
        gw.addr,
        client_config(
            &[&certs.ca_cert],
            Some((&certs.client_cert, &certs.client_key)),
            &[b"h2"],
        ),
        "/healthz",
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn certificate_files_are_reloaded_and_broken_ones_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_certs(dir.path());
    let (gw, store) = tls_gateway(dir.path(), false).await;
    let s = store.clone();
    let _watch = fuke::reload::watch_dirs("certs", store.watch_dirs(), move || {
        let _ = s.reload();
    })
    .unwrap();
    let second = devcerts::generate(&["localhost", "127.0.0.1"]).unwrap();
    let trust_both = client_config(&[&first.ca_cert, &second.ca_cert], None, &[b"http/1.1"]);
    let leaf = |pem: &str| {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };

    let (_, _, served) = tls_request(gw.addr, trust_both.clone(), "/healthz")
        .await
        .unwrap();
    assert_eq!(served, leaf(&first.server_cert));

    // Rotate: key first, then cert (a reader may see a mismatched pair in between; it must
    // keep serving the old one then).
    std::fs::write(dir.path().join("server.key"), &second.server_key).unwrap();
    std::fs::write(dir.path().join("server.pem"), &second.server_cert).unwrap();
    eventually("the new certificate to be served", || {
        let cfg = trust_both.clone();
        let want = leaf(&second.server_cert);
        async move {
            matches!(tls_request(gw.addr, cfg, "/healthz").await, Ok((_, _, got)) if got == want)
        }
    })
    .await;

    // Garbage on disk: reload fails, the current certificate stays.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    assert!(store.reload().is_err());
    let (_, _, served) = tls_request(gw.addr, trust_both, "/healthz").await.unwrap();
    assert_eq!(served, leaf(&second.server_cert));
}

#[tokio::test]
async fn upstream_behind_tls_with_an_extra_ca() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    let store = Arc::new(
        CertStore::open(
            &dir.path().join("server.pem"),
            &dir.path().join("server.key"),
        )
        .unwrap(),
    );
    let up = Upstream::start_on("127.0.0.1:0", Some(server_config(store, None).unwrap())).await;
    let base = format!("https://localhost:{}/v1", up.addr.port());
    let with_ca = policy_yaml(&base).replace(
        "    first_byte_timeout_ms: 1500\n",
        &format!(
            "    first_byte_timeout_ms: 1500\n    ca_file: {}\n",
            dir.path().join("ca.pem").display()
        ),
    );
    let gw = Gateway::start(&with_ca).await;
    let c = client();
    let body = r#"{"model":"gpt-test","messages":[{"role":"user","content":"over tls"}]}"#;
    let r = post(&c, &gw.url("/v1/chat/completions"), KEY_ACME, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "echo: over tls"
    );

    // Without the CA the upstream is not trusted: 502, not a silent downgrade.
    let gw = Gateway::start(&policy_yaml(&base)).await;
    let r = post(&c, &gw.url("/v1/chat/completions"), KEY_ACME, body).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
}
