//! Raw HTTP/1.1 over a `TcpStream`: bytes go out exactly as given, so nothing normalises a
//! malformed request; the response is parsed by hand (status, headers, body, chunked or not).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What came back on a connection.
#[derive(Debug)]
pub enum RawReply {
    /// A full HTTP response.
    Response {
        /// The status code.
        status: u16,
        /// Header names (lower case) and values.
        headers: Vec<(String, String)>,
        /// The body, de-chunked.
        body: Vec<u8>,
    },
    /// The server closed the connection without a response.
    Closed,
}

impl RawReply {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            RawReply::Response { headers, .. } => headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            RawReply::Closed => None,
        }
    }
}

/// How the request bytes are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendMode {
    /// All at once.
    Whole,
    /// All at once, then the connection stays open without sending more.
    Stall,
    /// The head one byte at a time, `pause` apart, until the server closes the connection.
    Trickle(Duration),
}

/// Sends `request` to `address` and reads until the server closes the connection or
/// `timeout` passes (then `None`).
pub async fn exchange(
    address: &str,
    request: &[u8],
    mode: SendMode,
    timeout: Duration,
) -> Option<RawReply> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(address).await.ok()?;
        match mode {
            SendMode::Whole | SendMode::Stall => {
                // A server may answer (413) and close before the whole body is written.
                let _ = stream.write_all(request).await;
            }
            SendMode::Trickle(pause) => {
                let (mut reader, mut writer) = stream.into_split();
                let mut received = Vec::new();
                for byte in request {
                    if writer.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    let mut probe = [0u8; 4096];
                    match tokio::time::timeout(pause, reader.read(&mut probe)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(parse(&received)),
                        Ok(Ok(n)) => received.extend_from_slice(&probe[..n]),
                        Err(_) => {}
                    }
                }
                let _ = reader.read_to_end(&mut received).await;
                return Some(parse(&received));
            }
        }
        let mut received = Vec::new();
        let _ = stream.read_to_end(&mut received).await;
        Some(parse(&received))
    })
    .await
    .ok()
    .flatten()
}

/// Parses a whole response (or nothing, if the connection closed without one).
pub fn parse(bytes: &[u8]) -> RawReply {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return RawReply::Closed;
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw = &bytes[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    RawReply::Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        raw = &raw[line_end + 2..];
        if size == 0 || raw.len() < size {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
    out
}
