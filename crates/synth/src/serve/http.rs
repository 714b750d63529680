//! Just enough HTTP/1.1 for an OpenAI-compatible server: requests parsed with `httparse` (head
//! size and body size capped, `Content-Length` or chunked bodies, `Expect: 100-continue`,
//! keep-alive and pipelining), responses with a length or chunked (for server-sent events).

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// Most bytes of a request line plus headers.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a request.
const MAX_HEADERS: usize = 64;

/// One parsed request.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept open after the response.
    pub keep_alive: bool,
}

/// Why no request could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    /// A socket error or timeout.
    Io(io::Error),
    /// The bytes are not an acceptable request: answer `status` and close.
    Bad { status: u16, message: String },
}

fn bad(status: u16, message: impl Into<String>) -> ReadError {
    ReadError::Bad {
        status,
        message: message.into(),
    }
}

/// A connection: the socket and any bytes read past the previous request.
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    max_body: usize,
}

impl Conn {
    pub fn new(stream: TcpStream, max_body: usize) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
            max_body,
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the next request.
    pub fn read_request(&mut self) -> Result<Request, ReadError> {
        let (head_len, method, path, minor, headers) = loop {
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut hs);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect();
                    break (
                        n,
                        req.method.unwrap_or_default().to_string(),
                        req.path.unwrap_or_default().to_string(),
                        req.version.unwrap_or(1),
                        headers,
                    );
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > MAX_HEAD {
                        return Err(bad(431, "request head over 64 KiB"));
                    }
                    match self.fill() {
                        Ok(0) if self.buf.is_empty() => return Err(ReadError::Closed),
                        Ok(0) => return Err(bad(400, "the connection closed mid-request")),
                        Ok(_) => {}
                        Err(e) if self.buf.is_empty() => return Err(ReadError::Io(e)),
                        Err(e) => return Err(bad(400, format!("reading the request: {e}"))),
                    }
                }
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(bad(431, format!("more than {MAX_HEADERS} headers")));
                }
                Err(e) => return Err(bad(400, format!("malformed HTTP request: {e}"))),
            }
        };
        self.buf.drain(..head_len);
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let connection = header("connection").unwrap_or("").to_ascii_lowercase();
        let keep_alive = if minor == 0 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let chunked =
            header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = match header("content-length") {
            Some(v) if !chunked => Some(
                v.parse::<usize>()
                    .map_err(|_| bad(400, format!("bad Content-Length `{v}`")))?,
            ),
            _ => None,
        };
        if let Some(n) = length
            && n > self.max_body
        {
            return Err(bad(
                413,
                format!("request body of {n} bytes; the limit is {}", self.max_body),
            ));
        }
        let wants_body = chunked || length.unwrap_or(0) > 0;
        if wants_body
            && self.buf.is_empty()
            && header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(ReadError::Io)?;
        }
        let body = if chunked {
            self.read_chunked()?
        } else {
            let n = length.unwrap_or(0);
            while self.buf.len() < n {
                match self.fill() {
                    Ok(0) => return Err(bad(400, "the connection closed mid-body")),
                    Ok(_) => {}
                    Err(e) => return Err(bad(400, format!("reading the body: {e}"))),
                }
            }
            self.buf.drain(..n).collect()
        };
        let path = path.split('?').next().unwrap_or_default().to_string();
        Ok(Request {
            method,
            path,
            body,
            keep_alive,
        })
    }

    /// A line ending in CRLF from the buffer (without it), reading as needed.
    fn line(&mut self) -> Result<String, ReadError> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(bad(400, "chunk header too long"));
            }
            match self.fill() {
                Ok(0) => return Err(bad(400, "the connection closed mid-body")),
                Ok(_) => {}
                Err(e) => return Err(bad(400, format!("reading the body: {e}"))),
            }
        }
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| bad(400, format!("bad chunk size `{size}`")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line()?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > self.max_body {
                return Err(bad(
                    413,
                    format!("request body over the limit of {} bytes", self.max_body),
                ));
            }
            while self.buf.len() < size + 2 {
                match self.fill() {
                    Ok(0) => return Err(bad(400, "the connection closed mid-body")),
                    Ok(_) => {}
                    Err(e) => return Err(bad(400, format!("reading the body: {e}"))),
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(bad(400, "chunk not followed by CRLF"));
            }
            self.buf.drain(..size + 2);
        }
    }

    fn head(status: u16, content_type: &str, extra: &str, keep_alive: bool) -> String {
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n{extra}Connection: {}\r\nServer: optimsyn\r\n\r\n",
            reason(status),
            if keep_alive { "keep-alive" } else { "close" }
        )
    }

    /// Writes a whole response with a `Content-Length`.
    pub fn write_response(
        &mut self,
        status: u16,
        content_type: &str,
        body: &[u8],
        keep_alive: bool,
    ) -> io::Result<()> {
        let mut out = Self::head(
            status,
            content_type,
            &format!("Content-Length: {}\r\n", body.len()),
            keep_alive,
        )
        .into_bytes();
        out.extend_from_slice(body);
        self.stream.write_all(&out)?;
        self.stream.flush()
    }

    /// Starts a chunked response (server-sent events).
    pub fn start_chunked(
        &mut self,
        status: u16,
        content_type: &str,
        keep_alive: bool,
    ) -> io::Result<()> {
        let head = Self::head(
            status,
            content_type,
            "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
            keep_alive,
        );
        self.stream.write_all(head.as_bytes())?;
        self.stream.flush()
    }

    /// Writes one chunk and flushes it.
    pub fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.stream.write_all(&out)?;
        self.stream.flush()
    }

    /// Closes after an error reply without cutting it off: stop writing, then read and drop what
    /// the client is still sending (bounded), so the close does not reset the connection before
    /// the client has read the reply.
    pub fn linger_close(mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self
            .stream
            .set_read_timeout(Some(std::time::Duration::from_millis(200)));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut chunk = [0u8; 16 * 1024];
        let mut total = 0usize;
        while total < (16 << 20) && std::time::Instant::now() < deadline {
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }

    /// Ends a chunked response.
    pub fn finish_chunked(&mut self) -> io::Result<()> {
        self.stream.write_all(b"0\r\n\r\n")?;
        self.stream.flush()
    }
}

/// The reason phrase of the statuses this server sends.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}
