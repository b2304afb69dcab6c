//! A walsender connection: socket, TLS negotiation, startup, authentication,
//! message framing and simple queries.
//!
//! postgres-protocol provides the message encoders, SCRAM and MD5, and the
//! parser for ordinary backend messages; it knows neither `CopyBothResponse`
//! nor our need for zero-copy `CopyData`, so those two are framed here.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::{DbError, Error, tls};
use crate::config::{DatabaseUrl, Host, SslMode};

/// The largest backend message accepted. Postgres caps a field at 1 GiB; a
/// hostile or corrupt length beyond this must not make us reserve memory.
const MAX_MESSAGE_LEN: usize = (1 << 30) + (64 << 20);
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
const COPY_DATA_TAG: u8 = b'd';

/// A byte stream to the server, plain or TLS.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// A backend message as the replication client sees it.
pub(crate) enum Backend {
    /// `W`: the server entered CopyBoth mode.
    CopyBothResponse,
    /// `d`: one CopyData payload (zero-copy).
    CopyData(Bytes),
    /// Anything else, parsed by postgres-protocol.
    Other(Message),
}

/// An authenticated replication connection, ready for commands.
pub struct Connection {
    socket: Box<dyn Socket>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Server parameters reported at startup (`server_version`, ...).
    pub parameters: HashMap<String, String>,
}

impl Connection {
    /// Connects, negotiates TLS, starts a `replication=database` session with
    /// pinned output formats, and authenticates.
    pub async fn connect(url: &DatabaseUrl) -> Result<Connection, Error> {
        tokio::time::timeout(url.connect_timeout, Self::connect_inner(url))
            .await
            .map_err(|_| Error::Timeout("connecting to postgres"))?
    }

    async fn connect_inner(url: &DatabaseUrl) -> Result<Connection, Error> {
        let socket = open_socket(url).await?;
        let mut conn = Connection {
            socket,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            parameters: HashMap::new(),
        };
        conn.startup(url).await?;
        Ok(conn)
    }

    async fn startup(&mut self, url: &DatabaseUrl) -> Result<(), Error> {
        // Formats are pinned so that text values are the same whatever the
        // server's or role's defaults are.
        let params = [
            ("user", url.user.as_str()),
            ("database", url.dbname.as_str()),
            ("replication", "database"),
            ("application_name", url.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
            ("TimeZone", "UTC"),
            ("bytea_output", "hex"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)
            .map_err(Error::io("writing the startup message"))?;
        self.flush("sending the startup message").await?;
        self.authenticate(url).await?;
        loop {
            match self.expect_other("starting up").await? {
                Message::ParameterStatus(body) => {
                    if let (Ok(name), Ok(value)) = (body.name(), body.value()) {
                        self.parameters.insert(name.to_owned(), value.to_owned());
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(Error::Db(db_error(body.fields()))),
                _ => return Err(Error::Protocol("unexpected message during startup".into())),
            }
        }
    }

    async fn authenticate(&mut self, url: &DatabaseUrl) -> Result<(), Error> {
        let password = || {
            url.password.as_deref().ok_or_else(|| {
                Error::Auth(format!(
                    "the server asks a password for role {:?}; put it in the database url",
                    url.user
                ))
            })
        };
        match self.expect_other("authenticating").await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                let mut pw = password()?.as_bytes().to_vec();
                pw.push(0);
                frontend::password_message(&pw, &mut self.write_buf)
                    .map_err(Error::io("writing the password"))?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(url.user.as_bytes(), password()?.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut self.write_buf)
                    .map_err(Error::io("writing the password"))?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut scram = false;
                while let Some(m) = mechanisms
                    .next()
                    .map_err(|e| Error::Protocol(format!("sasl mechanisms: {e}")))?
                {
                    scram |= m == SCRAM_SHA_256;
                }
                if !scram {
                    return Err(Error::Auth(
                        "the server offers no SASL mechanism walcast supports (SCRAM-SHA-256)"
                            .into(),
                    ));
                }
                return self.scram(password()?).await;
            }
            Message::ErrorResponse(body) => return Err(Error::Db(db_error(body.fields()))),
            _ => {
                return Err(Error::Auth(
                    "the server asks for an authentication method walcast does not support (use trust, md5, password or scram-sha-256)".into(),
                ));
            }
        }
        self.flush("sending the password").await?;
        match self.expect_other("authenticating").await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(body) => Err(Error::Db(db_error(body.fields()))),
            _ => Err(Error::Protocol(
                "unexpected message after the password".into(),
            )),
        }
    }

    async fn scram(&mut self, password: &str) -> Result<(), Error> {
        // Channel binding is not negotiated ('n'), which any server accepts.
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.write_buf)
            .map_err(Error::io("writing the sasl response"))?;
        self.flush("authenticating").await?;
        let server_first = match self.expect_other("authenticating").await? {
            Message::AuthenticationSaslContinue(body) => body.data().to_vec(),
            Message::ErrorResponse(body) => return Err(Error::Db(db_error(body.fields()))),
            _ => return Err(Error::Protocol("expected SASL continue".into())),
        };
        scram
            .update(&server_first)
            .map_err(|e| Error::Auth(format!("scram: {e}")))?;
        frontend::sasl_response(scram.message(), &mut self.write_buf)
            .map_err(Error::io("writing the sasl response"))?;
        self.flush("authenticating").await?;
        match self.expect_other("authenticating").await? {
            Message::AuthenticationSaslFinal(body) => scram
                .finish(body.data())
                .map_err(|e| Error::Auth(format!("the server failed scram verification: {e}")))?,
            Message::ErrorResponse(body) => return Err(Error::Db(db_error(body.fields()))),
            _ => return Err(Error::Protocol("expected SASL final".into())),
        }
        match self.expect_other("authenticating").await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(body) => Err(Error::Db(db_error(body.fields()))),
            _ => Err(Error::Protocol("expected authentication ok".into())),
        }
    }

    /// Runs one statement with the simple query protocol and returns its rows
    /// as text (`None` for NULL).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
        frontend::query(sql, &mut self.write_buf).map_err(Error::io("writing a query"))?;
        self.flush("sending a query").await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.expect_other("running a query").await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges
                        .next()
                        .map_err(|e| Error::Protocol(format!("data row: {e}")))?
                    {
                        row.push(range.map(|r| {
                            String::from_utf8_lossy(buf.get(r).unwrap_or_default()).into_owned()
                        }));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(db_error(body.fields())),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(Error::Db(e)),
            None => Ok(rows),
        }
    }

    /// Sends a query that switches the session to CopyBoth and waits for the switch.
    pub(crate) async fn start_copy_both(&mut self, sql: &str) -> Result<(), Error> {
        frontend::query(sql, &mut self.write_buf).map_err(Error::io("writing a query"))?;
        self.flush("starting replication").await?;
        loop {
            match self.read("starting replication").await? {
                Backend::CopyBothResponse => return Ok(()),
                Backend::Other(Message::ErrorResponse(body)) => {
                    return Err(Error::Db(db_error(body.fields())));
                }
                Backend::Other(Message::NoticeResponse(_)) => {}
                _ => return Err(Error::Protocol("expected CopyBothResponse".into())),
            }
        }
    }

    async fn expect_other(&mut self, context: &'static str) -> Result<Message, Error> {
        match self.read(context).await? {
            Backend::Other(message) => Ok(message),
            _ => Err(Error::Protocol(format!("copy message while {context}"))),
        }
    }

    /// Reads one backend message. Cancel-safe: partial input stays buffered.
    pub(crate) async fn read(&mut self, context: &'static str) -> Result<Backend, Error> {
        loop {
            if let Some(message) = self.parse_buffered()? {
                return Ok(message);
            }
            let n = self
                .socket
                .read_buf(&mut self.read_buf)
                .await
                .map_err(Error::io(context))?;
            if n == 0 {
                return Err(Error::Io {
                    context,
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    /// Whether a whole message is already buffered: reading it will not wait.
    pub(crate) fn has_buffered_message(&self) -> bool {
        self.read_buf.get(1..5).is_some_and(|len| {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            self.read_buf.len() > len
        })
    }

    /// Whether a whole message can be read without waiting: what is
    /// buffered, plus whatever the socket already holds (one read attempt
    /// that never waits). Cancel-safe, like [`read`](Self::read).
    pub(crate) async fn message_ready(&mut self) -> bool {
        if self.has_buffered_message() {
            return true;
        }
        // A zero timeout still polls the read once: it takes what the
        // kernel has and gives up instead of waiting for more.
        let filled = tokio::time::timeout(
            std::time::Duration::ZERO,
            self.socket.read_buf(&mut self.read_buf),
        )
        .await;
        matches!(filled, Ok(Ok(n)) if n > 0) && self.has_buffered_message()
    }

    fn parse_buffered(&mut self) -> Result<Option<Backend>, Error> {
        let Some(header) = self.read_buf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(Error::Protocol(format!("invalid message length {len}")));
        }
        if self.read_buf.len() < len + 1 {
            self.read_buf.reserve(len + 1 - self.read_buf.len());
            return Ok(None);
        }
        match tag {
            COPY_DATA_TAG => {
                let mut frame = self.read_buf.split_to(len + 1);
                frame.advance(5);
                Ok(Some(Backend::CopyData(frame.freeze())))
            }
            COPY_BOTH_RESPONSE_TAG => {
                self.read_buf.advance(len + 1);
                Ok(Some(Backend::CopyBothResponse))
            }
            _ => match Message::parse(&mut self.read_buf) {
                Ok(Some(message)) => Ok(Some(Backend::Other(message))),
                Ok(None) => Ok(None),
                Err(e) => Err(Error::Protocol(e.to_string())),
            },
        }
    }

    /// Queues a CopyData message carrying `payload`.
    pub(crate) fn queue_copy_data(&mut self, payload: &[u8]) -> Result<(), Error> {
        frontend::CopyData::new(payload)
            .map_err(Error::io("writing copy data"))?
            .write(&mut self.write_buf);
        Ok(())
    }

    /// Queues CopyDone, ending our side of the replication stream.
    pub(crate) fn queue_copy_done(&mut self) {
        frontend::copy_done(&mut self.write_buf);
    }

    /// Writes everything queued.
    pub(crate) async fn flush(&mut self, context: &'static str) -> Result<(), Error> {
        self.socket
            .write_all(&self.write_buf)
            .await
            .map_err(Error::io(context))?;
        self.write_buf.clear();
        self.socket.flush().await.map_err(Error::io(context))
    }

    /// Says goodbye (`Terminate`) and closes the socket.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush("closing")).await;
        let _ = self.socket.shutdown().await;
    }
}

async fn open_socket(url: &DatabaseUrl) -> Result<Box<dyn Socket>, Error> {
    let host = match &url.host {
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", url.port));
            let socket = UnixStream::connect(&path)
                .await
                .map_err(|source| Error::Connect {
                    addr: path.display().to_string(),
                    source,
                })?;
            // As libpq: TLS is never used on a Unix socket.
            return Ok(Box::new(socket));
        }
        Host::Tcp(host) => host,
    };
    let addr = format!("{}:{}", url.hostaddr.as_deref().unwrap_or(host), url.port);
    let mut socket = TcpStream::connect(&addr)
        .await
        .map_err(|source| Error::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = socket.set_nodelay(true);
    let Some(config) = tls::client_config(url)? else {
        return Ok(Box::new(socket));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    socket
        .write_all(&request)
        .await
        .map_err(Error::io("requesting tls"))?;
    let answer = socket
        .read_u8()
        .await
        .map_err(Error::io("requesting tls"))?;
    match (answer, url.ssl_mode) {
        (b'S', _) => {
            let name = tls::server_name(host)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, socket)
                .await
                .map_err(|e| {
                    match e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    {
                        Some(tls_error) => {
                            Error::Tls(format!("handshake with {addr} failed: {tls_error}"))
                        }
                        None => Error::Io {
                            context: "tls handshake",
                            source: e,
                        },
                    }
                })?;
            Ok(Box::new(tls))
        }
        (b'N', SslMode::Prefer) => Ok(Box::new(socket)),
        (b'N', _) => Err(Error::TlsUnsupported),
        (other, _) => Err(Error::Protocol(format!(
            "unexpected answer {other:#04x} to the tls request"
        ))),
    }
}

/// Collects an `ErrorResponse`'s fields.
pub(crate) fn db_error(mut fields: ErrorFields<'_>) -> DbError {
    let mut error = DbError::default();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => error.severity = value,
            b'S' if error.severity.is_empty() => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    error
}
