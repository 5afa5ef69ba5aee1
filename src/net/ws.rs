//! WebSocket without Lua, over tokio-tungstenite: the server handshake (with the endpoint's
//! path checked, 404 otherwise), the IN limit as the largest message, and how a socket's
//! framing maps onto messages: `bson` takes binary messages that are exactly one BSON
//! document, `text` takes text messages (valid UTF-8, checked by tungstenite), `packet`
//! takes either as bytes. What breaks the rules closes the connection with the close code
//! RFC 6455 names for it (1003 unsupported data, 1007 invalid payload, 1009 too big, 1002
//! protocol error).

use crate::net::framing::Framing;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// Why a connection is closed by us: the code and reason sent in the close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

impl Refusal {
    fn new(code: CloseCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code: code.into(),
            reason: reason.into(),
        }
    }

    /// The close frame (its reason cut to the 123 bytes a close frame holds).
    pub fn frame(&self) -> CloseFrame {
        let mut r = self.reason.as_str();
        while r.len() > 123 {
            let mut cut = 123;
            while !r.is_char_boundary(cut) {
                cut -= 1;
            }
            r = &r[..cut];
        }
        CloseFrame {
            code: CloseCode::from(self.code),
            reason: r.to_string().into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

/// The message limits for a socket whose IN is `max_in`.
pub fn config(max_in: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_in))
        .max_frame_size(Some(max_in))
}

/// Runs the server handshake. `path` (e.g. `/game`) must match the request's path unless it
/// is empty or `/`. Returns the stream and the request's path with its query.
pub async fn accept<S>(s: S, path: &str, max_in: usize) -> Result<(WebSocketStream<S>, String), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut seen = String::new();
    let want = path.trim_end_matches('/');
    // The callback's type is tungstenite's, error variant size included.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        seen = req.uri().to_string();
        if !want.is_empty() && req.uri().path().trim_end_matches('/') != want {
            let mut r = ErrorResponse::new(Some(format!("no websocket at {}\n", req.uri().path())));
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            return Err(r);
        }
        Ok(resp)
    };
    match tokio_tungstenite::accept_hdr_async_with_config(s, check, Some(config(max_in))).await {
        Ok(ws) => Ok((ws, seen)),
        Err(tungstenite::Error::Http(r)) => Err(format!(
            "websocket handshake refused with {} for {}",
            r.status(),
            if seen.is_empty() { "-" } else { &seen }
        )),
        Err(e) => Err(format!("websocket handshake failed: {e}")),
    }
}

/// What a received message holds for the script: `Ok(Some(bytes))` to deliver (a whole BSON
/// document, a text line, a packet), `Ok(None)` for control messages (tungstenite answers
/// pings itself), or the reason to close.
pub fn inbound(framing: Framing, msg: Message) -> Result<Option<Bytes>, Refusal> {
    match (framing, msg) {
        (_, Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => Ok(None),
        (Framing::Bson | Framing::Packet, Message::Binary(b)) => {
            // The length's high bit marks an encrypted document (opened with socket.crypto).
            let head = (b.len() >= 4).then(|| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            let encrypted = head.is_some_and(|h| h & crate::net::crypto::ENCRYPTED != 0);
            let len = head.map(|h| (h & !crate::net::crypto::ENCRYPTED) as usize);
            if b.len() < 5 || len != Some(b.len()) || (!encrypted && b[b.len() - 1] != 0) {
                return Err(Refusal::new(
                    CloseCode::Invalid,
                    format!("binary message of {} bytes is not one BSON document", b.len()),
                ));
            }
            Ok(Some(b))
        }
        (Framing::Bson | Framing::Packet, Message::Text(_)) => Err(Refusal::new(
            CloseCode::Unsupported,
            "text message on a bson socket (send binary BSON)",
        )),
        (Framing::Text, Message::Text(t)) => Ok(Some(Bytes::from(t))),
        (Framing::Text, Message::Binary(_)) => Err(Refusal::new(
            CloseCode::Unsupported,
            "binary message on a text socket",
        )),
        (Framing::Raw, Message::Binary(b)) => Ok(Some(b)),
        (Framing::Raw, Message::Text(t)) => Ok(Some(Bytes::from(t))),
    }
}

/// The close that answers a read error, or `None` when the connection is simply gone.
pub fn read_error(e: &tungstenite::Error) -> Option<Refusal> {
    use tungstenite::Error as E;
    match e {
        E::Capacity(c) => Some(Refusal::new(CloseCode::Size, format!("message too big: {c}"))),
        E::Utf8(m) => Some(Refusal::new(
            CloseCode::Invalid,
            format!("text message is not valid UTF-8: {m}"),
        )),
        // The peer dropped the connection without a close frame: gone, not an offence.
        E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => None,
        E::Protocol(p) => Some(Refusal::new(CloseCode::Protocol, format!("protocol error: {p}"))),
        _ => None,
    }
}

/// A message for the peer: text on `text` sockets (must be UTF-8), binary otherwise.
pub fn outbound(framing: Framing, payload: Vec<u8>) -> Result<Message, String> {
    match framing {
        Framing::Text => String::from_utf8(payload)
            .map(|s| Message::Text(s.into()))
            .map_err(|_| "a text websocket can only send UTF-8 text".to_string()),
        _ => Ok(Message::Binary(payload.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use std::io::{Read, Write};

    #[test]
    fn mapping() {
        let doc = Bytes::from_static(&[5, 0, 0, 0, 0]);
        assert_eq!(
            inbound(Framing::Bson, Message::Binary(doc.clone())),
            Ok(Some(doc))
        );
        let e = inbound(
            Framing::Bson,
            Message::Binary(Bytes::from_static(&[9, 0, 0, 0, 0])),
        )
        .unwrap_err();
        assert_eq!(e.code, 1007);
        assert_eq!(
            inbound(Framing::Bson, Message::Text("x".into()))
                .unwrap_err()
                .code,
            1003
        );
        assert_eq!(
            inbound(Framing::Text, Message::Text("hé".into())),
            Ok(Some(Bytes::from("hé")))
        );
        assert_eq!(
            inbound(Framing::Text, Message::Binary(Bytes::new()))
                .unwrap_err()
                .code,
            1003
        );
        assert_eq!(inbound(Framing::Packet, Message::Ping(Bytes::new())), Ok(None));
        assert!(outbound(Framing::Text, vec![0xff]).is_err());
        assert!(matches!(outbound(Framing::Bson, vec![1]), Ok(Message::Binary(_))));
        let long = Refusal::new(CloseCode::Size, "é".repeat(100));
        assert!(long.frame().reason.len() <= 123);
    }

    /// A server that echoes `?text` messages until an error, then closes as `read_error`
    /// says; returns the port.
    fn start(path: &'static str, max_in: usize) -> u16 {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap().port()).unwrap();
                loop {
                    let (s, _) = l.accept().await.unwrap();
                    tokio::spawn(async move {
                        let Ok((mut ws, _)) = accept(s, path, max_in).await else {
                            return;
                        };
                        while let Some(m) = ws.next().await {
                            let r = match m {
                                Ok(m) => inbound(Framing::Text, m),
                                Err(e) => match read_error(&e) {
                                    Some(r) => Err(r),
                                    None => return,
                                },
                            };
                            match r {
                                Ok(Some(b)) => ws
                                    .send(outbound(Framing::Text, b.to_vec()).unwrap())
                                    .await
                                    .unwrap(),
                                Ok(None) => {}
                                Err(r) => {
                                    let _ = ws.close(Some(r.frame())).await;
                                    return;
                                }
                            }
                        }
                    });
                }
            });
        });
        rx.recv().unwrap()
    }

    /// Opens a websocket by hand and sends `frame` (already masked by the caller's choice of
    /// a zero mask); returns what the server sent after the handshake.
    fn raw_session(port: u16, path: &str, frame: &[u8]) -> (String, Vec<u8>) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut rest = Vec::new();
        if head.starts_with("HTTP/1.1 101") {
            s.write_all(frame).unwrap();
            let _ = s.read_to_end(&mut rest);
        } else {
            let _ = s.read_to_end(&mut rest);
        }
        (head, rest)
    }

    /// A masked client frame with a zero mask (payload unchanged).
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        assert!(payload.len() < 126);
        f.push(0x80 | payload.len() as u8);
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// The close code in a server's close frame at the start of `b`.
    fn close_code(b: &[u8]) -> Option<u16> {
        (b.len() >= 4 && b[0] == 0x88).then(|| u16::from_be_bytes([b[2], b[3]]))
    }

    #[test]
    fn handshake_echo_and_closes() {
        let port = start("/game", 64);
        // Wrong path: 404 and no upgrade.
        let (head, _) = raw_session(port, "/other", b"");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        // Echo, then an invalid UTF-8 text frame: 1007.
        let mut two = frame(1, b"hi");
        two.extend(frame(1, b"\xff\xfe"));
        let (head, rest) = raw_session(port, "/game?x=1", &two);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(&rest[..4], &[0x81, 2, b'h', b'i']);
        assert_eq!(close_code(&rest[4..]), Some(1007), "{rest:?}");
        // Over IN (64): 1009.
        let (_, rest) = raw_session(port, "/game", &frame(2, &[b'a'; 100]));
        assert_eq!(close_code(&rest), Some(1009), "{rest:?}");
        // Binary on a text socket: 1003.
        let (_, rest) = raw_session(port, "/game", &frame(2, b"x"));
        assert_eq!(close_code(&rest), Some(1003), "{rest:?}");
        // A ping is answered with a pong carrying the same payload.
        let mut p = frame(9, b"pp");
        p.extend(frame(8, &[0x03, 0xe8]));
        let (_, rest) = raw_session(port, "/game", &p);
        assert_eq!(&rest[..4], &[0x8a, 2, b'p', b'p']);
    }
}
