//! TLS for listeners with rustls (ring, no OpenSSL): a certificate chain and key read from
//! PEM files, reloaded when either file changes (checked at most once a second, on accept),
//! the handshake with a deadline, ALPN (`h2`, `http/1.1`) for HTTPS, and `Stream`, a
//! connection that is plain TCP or TLS. The client side (`client_config`, `connect`) serves
//! `broker.join("tls://...")` and `wss://`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A client's TLS connection.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN protocols offered by HTTPS listeners, best first.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A server configuration from PEM bytes: the chain (leaf first) and its private key
/// (PKCS#8, SEC1 or PKCS#1).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8], alpn: &[&[u8]]) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("certificate: no CERTIFICATE block in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

fn stamp(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

struct Loaded {
    acceptor: TlsAcceptor,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

/// A listener's certificate files and the acceptor made from them. One per listener, on the
/// instance's thread.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    alpn: Vec<Vec<u8>>,
    loaded: RefCell<Loaded>,
}

fn read_pair(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<ServerConfig, String> {
    let c = std::fs::read(cert).map_err(|e| format!("cannot read certificate {}: {e}", cert.display()))?;
    let k = std::fs::read(key).map_err(|e| format!("cannot read key {}: {e}", key.display()))?;
    server_config(&c, &k, alpn).map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))
}

impl TlsFiles {
    /// Reads and checks the files now; an error names the file and the problem.
    pub fn load(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<TlsFiles, String> {
        let stamps = (stamp(cert), stamp(key));
        let cfg = read_pair(cert, key, alpn)?;
        Ok(TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            loaded: RefCell::new(Loaded {
                acceptor: TlsAcceptor::from(Arc::new(cfg)),
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The acceptor for a new connection. When a second has passed since the last look and
    /// either file changed, the pair is read again; a pair that does not load is logged and
    /// the previous one kept.
    pub fn acceptor(&self, log: &str) -> TlsAcceptor {
        let mut l = self.loaded.borrow_mut();
        if l.checked.elapsed() >= Duration::from_secs(1) {
            l.checked = Instant::now();
            let now = (stamp(&self.cert), stamp(&self.key));
            if now != l.stamps {
                l.stamps = now;
                let alpn: Vec<&[u8]> = self.alpn.iter().map(|p| p.as_slice()).collect();
                match read_pair(&self.cert, &self.key, &alpn) {
                    Ok(cfg) => {
                        l.acceptor = TlsAcceptor::from(Arc::new(cfg));
                        log::info!(target: log, "tls: reloaded {}", self.cert.display());
                    }
                    Err(e) => log::warn!(target: log, "tls: keeping the previous certificate: {e}"),
                }
            }
        }
        l.acceptor.clone()
    }
}

/// A client configuration trusting the public roots (webpki-roots) and, when given, the
/// certificates of the PEM file `ca` (a private CA).
pub fn client_config(ca: Option<&Path>, alpn: &[&[u8]]) -> Result<ClientConfig, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read CA file {}: {e}", ca.display()))?;
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("CA file {}: {e}", ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("CA file {}: no CERTIFICATE block", ca.display()));
        }
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Runs the client side of the handshake within `HANDSHAKE_TIMEOUT`, checking the server's
/// certificate against `name` (a DNS name or an IP address).
pub async fn connect(cfg: Arc<ClientConfig>, name: &str, tcp: TcpStream) -> Result<ClientStream, String> {
    let server =
        ServerName::try_from(name.to_string()).map_err(|e| format!("tls server name '{name}': {e}"))?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(cfg).connect(server, tcp)).await {
        Err(_) => Err(format!(
            "tls handshake not finished within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("tls handshake failed: {e}")),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Runs the server side of the handshake within `HANDSHAKE_TIMEOUT`. Returns the stream and
/// whether the client chose HTTP/2 by ALPN.
pub async fn accept(acceptor: TlsAcceptor, tcp: TcpStream) -> Result<(Stream, bool), String> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Err(_) => Err(format!(
            "tls handshake not finished within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("tls handshake failed: {e}")),
        Ok(Ok(s)) => {
            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok((Stream::Tls(Box::new(s)), h2))
        }
    }
}

/// A connection: plain TCP or TLS over TCP.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Writes a throw-away CA and a `localhost` / 127.0.0.1 certificate signed by it into `dir`
/// with the `openssl` command: `(ca.pem, cert.pem, key.pem)`. For tests and examples.
pub fn make_test_ca(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("openssl: {e} (scripts/setup installs it)"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=stage test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat())?;
    run(&[
        &["req"][..],
        &ec,
        &["-keyout", "key.pem", "-out", "cert.csr", "-subj", "/CN=localhost"],
    ]
    .concat())?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    run(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ])?;
    Ok((dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn client(ca: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let mut cfg =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    #[test]
    fn handshake_alpn_reload_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = make_test_ca(dir.path()).unwrap();
        let files = TlsFiles::load(&cert, &key, ALPN_HTTP).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            for (alpn, want_h2) in [
                (&[&b"h2"[..], b"http/1.1"][..], true),
                (&[&b"http/1.1"[..]][..], false),
            ] {
                let conn = client(&ca, alpn);
                let c = tokio::spawn(async move {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    let mut s = conn
                        .connect(ServerName::try_from("localhost").unwrap(), tcp)
                        .await
                        .unwrap();
                    s.write_all(b"ping").await.unwrap();
                    let mut b = [0u8; 4];
                    s.read_exact(&mut b).await.unwrap();
                    b
                });
                let (tcp, _) = l.accept().await.unwrap();
                let (mut s, h2) = accept(files.acceptor("t"), tcp).await.unwrap();
                assert_eq!(h2, want_h2);
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await.unwrap();
                s.write_all(b"pong").await.unwrap();
                assert_eq!(&c.await.unwrap(), b"pong");
            }
            // Garbage instead of a ClientHello: a clear error, not a hang.
            let c = tokio::spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
                let mut v = vec![];
                let _ = tcp.read_to_end(&mut v).await;
            });
            let (tcp, _) = l.accept().await.unwrap();
            let e = accept(files.acceptor("t"), tcp).await.err().unwrap();
            assert!(e.starts_with("tls handshake failed"), "{e}");
            c.await.unwrap();
        });
        // A changed pair is picked up; a broken one keeps the previous.
        let before = Arc::as_ptr(files.acceptor("t").config());
        files.loaded.borrow_mut().checked -= Duration::from_secs(2);
        std::fs::write(&cert, b"not a certificate").unwrap();
        assert_eq!(Arc::as_ptr(files.acceptor("t").config()), before);
        let d2 = tempfile::tempdir().unwrap();
        let (_, c2, k2) = make_test_ca(d2.path()).unwrap();
        std::fs::copy(&c2, &cert).unwrap();
        std::fs::copy(&k2, &key).unwrap();
        files.loaded.borrow_mut().checked -= Duration::from_secs(2);
        files.loaded.borrow_mut().stamps = (None, None);
        assert_ne!(Arc::as_ptr(files.acceptor("t").config()), before);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = TlsFiles::load(&dir.path().join("nope.pem"), &dir.path().join("k.pem"), &[])
            .err()
            .unwrap();
        assert!(
            e.contains("cannot read certificate") && e.contains("nope.pem"),
            "{e}"
        );
        std::fs::write(dir.path().join("c.pem"), "hello").unwrap();
        std::fs::write(dir.path().join("k.pem"), "hello").unwrap();
        let e = TlsFiles::load(&dir.path().join("c.pem"), &dir.path().join("k.pem"), &[])
            .err()
            .unwrap();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let (_, cert, _) = make_test_ca(dir.path()).unwrap();
        let e = TlsFiles::load(&cert, &dir.path().join("k.pem"), &[])
            .err()
            .unwrap();
        assert!(e.contains("key"), "{e}");
    }
}
