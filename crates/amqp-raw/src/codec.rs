//! The wire encoding of what the raw client reads and writes: big-endian fields,
//! basic-class properties, header tables (decoded with a depth bound, validated as lapin
//! would at any depth without recursion).

use super::types::{MAX_TABLE_DEPTH, RawError, RawProperties, RawTable, RawValue};

/// The basic class, whose content headers carry the properties below.
const BASIC: u16 = 60;

const SHORT: RawError = RawError::Protocol("a frame shorter than its contents");

/// Big-endian reads over a byte slice; running out is a protocol error, never a panic.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], RawError> {
        let end = self.at.checked_add(n).ok_or(SHORT)?;
        let slice = self.bytes.get(self.at..end).ok_or(SHORT)?;
        self.at = end;
        Ok(slice)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], RawError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, RawError> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, RawError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, RawError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, RawError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(super) fn short_string(&mut self) -> Result<&'a [u8], RawError> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }
    pub(super) fn long_string(&mut self) -> Result<&'a [u8], RawError> {
        let len = self.u32()?;
        self.take(len as usize)
    }
    pub(super) fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// Big-endian writes into a buffer.
#[derive(Debug, Default)]
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn method(class: u16, method: u16) -> Writer {
        let mut w = Writer::default();
        w.u16(class);
        w.u16(method);
        w
    }
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Short strings longer than 255 bytes are cut: the protocol cannot carry more.
    pub(super) fn short_string(&mut self, s: &[u8]) {
        let s = &s[..s.len().min(255)];
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s);
    }
    pub(super) fn long_string(&mut self, s: &[u8]) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s);
    }
    pub(super) fn table(&mut self, encoded_fields: &[u8]) {
        self.long_string(encoded_fields);
    }
    pub(super) fn table_entry(&mut self, key: &[u8], value: impl FnOnce(&mut Writer)) {
        self.short_string(key);
        value(self);
    }
    pub(super) fn long_string_value(&mut self, s: &[u8]) {
        self.u8(b'S');
        self.long_string(s);
    }
}

/// Property flag bits of the basic class, first property in the highest bit.
mod flag {
    pub(super) const CONTENT_TYPE: u16 = 1 << 15;
    pub(super) const CONTENT_ENCODING: u16 = 1 << 14;
    pub(super) const HEADERS: u16 = 1 << 13;
    pub(super) const DELIVERY_MODE: u16 = 1 << 12;
    pub(super) const PRIORITY: u16 = 1 << 11;
    pub(super) const CORRELATION_ID: u16 = 1 << 10;
    pub(super) const REPLY_TO: u16 = 1 << 9;
    pub(super) const EXPIRATION: u16 = 1 << 8;
    pub(super) const MESSAGE_ID: u16 = 1 << 7;
    pub(super) const TIMESTAMP: u16 = 1 << 6;
    pub(super) const TYPE: u16 = 1 << 5;
    pub(super) const USER_ID: u16 = 1 << 4;
    pub(super) const APP_ID: u16 = 1 << 3;
    pub(super) const CLUSTER_ID: u16 = 1 << 2;
    /// Another flags word follows (never for the basic class; tolerated and ignored).
    pub(super) const CONTINUED: u16 = 1;
}

pub(super) fn decode_properties(r: &mut Reader<'_>) -> Result<RawProperties, RawError> {
    let mut flags = r.u16()?;
    let first = flags;
    while flags & flag::CONTINUED != 0 {
        flags = r.u16()?;
    }
    let flags = first;
    let has = |bit: u16| flags & bit != 0;
    let short = |r: &mut Reader<'_>, bit: u16| -> Result<Option<Vec<u8>>, RawError> {
        if has(bit) { r.short_string().map(|s| Some(s.to_vec())) } else { Ok(None) }
    };
    let mut p = RawProperties {
        content_type: short(r, flag::CONTENT_TYPE)?,
        content_encoding: short(r, flag::CONTENT_ENCODING)?,
        ..RawProperties::default()
    };
    if has(flag::HEADERS) {
        p.headers = Some(RawTable::from_bytes(r.long_string()?.to_vec()));
    }
    if has(flag::DELIVERY_MODE) {
        p.delivery_mode = Some(r.u8()?);
    }
    if has(flag::PRIORITY) {
        p.priority = Some(r.u8()?);
    }
    p.correlation_id = short(r, flag::CORRELATION_ID)?;
    p.reply_to = short(r, flag::REPLY_TO)?;
    p.expiration = short(r, flag::EXPIRATION)?;
    p.message_id = short(r, flag::MESSAGE_ID)?;
    if has(flag::TIMESTAMP) {
        p.timestamp = Some(r.u64()?);
    }
    p.kind = short(r, flag::TYPE)?;
    p.user_id = short(r, flag::USER_ID)?;
    p.app_id = short(r, flag::APP_ID)?;
    p.cluster_id = short(r, flag::CLUSTER_ID)?;
    Ok(p)
}

/// Encodes `p` as a content header's property flags and list.
pub(super) fn encode_properties(p: &RawProperties, w: &mut Writer) {
    let mut flags = 0u16;
    let present: [(u16, bool); 14] = [
        (flag::CONTENT_TYPE, p.content_type.is_some()),
        (flag::CONTENT_ENCODING, p.content_encoding.is_some()),
        (flag::HEADERS, p.headers.is_some()),
        (flag::DELIVERY_MODE, p.delivery_mode.is_some()),
        (flag::PRIORITY, p.priority.is_some()),
        (flag::CORRELATION_ID, p.correlation_id.is_some()),
        (flag::REPLY_TO, p.reply_to.is_some()),
        (flag::EXPIRATION, p.expiration.is_some()),
        (flag::MESSAGE_ID, p.message_id.is_some()),
        (flag::TIMESTAMP, p.timestamp.is_some()),
        (flag::TYPE, p.kind.is_some()),
        (flag::USER_ID, p.user_id.is_some()),
        (flag::APP_ID, p.app_id.is_some()),
        (flag::CLUSTER_ID, p.cluster_id.is_some()),
    ];
    for (bit, set) in present {
        if set {
            flags |= bit;
        }
    }
    w.u16(flags);
    let short = |w: &mut Writer, s: &Option<Vec<u8>>| {
        if let Some(s) = s {
            w.short_string(s);
        }
    };
    short(w, &p.content_type);
    short(w, &p.content_encoding);
    if let Some(headers) = &p.headers {
        w.table(&headers.bytes);
    }
    if let Some(mode) = p.delivery_mode {
        w.u8(mode);
    }
    if let Some(priority) = p.priority {
        w.u8(priority);
    }
    short(w, &p.correlation_id);
    short(w, &p.reply_to);
    short(w, &p.expiration);
    short(w, &p.message_id);
    if let Some(timestamp) = p.timestamp {
        w.u64(timestamp);
    }
    short(w, &p.kind);
    short(w, &p.user_id);
    short(w, &p.app_id);
    short(w, &p.cluster_id);
}

/// The content header payload of a message with `properties` and a body of `body_len`
/// bytes: class, weight, body size, properties.
pub fn content_header(properties: &RawProperties, body_len: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u16(BASIC);
    w.u16(0);
    w.u64(body_len);
    encode_properties(properties, &mut w);
    w.0
}

/// Why lapin would fail to decode a header table of these bytes (a field name that is
/// not UTF-8, a field of a type it does not know, a length that overruns), or `None`
/// when it would decode it. Walks any depth with an explicit stack: no recursion.
pub fn table_problem(bytes: &[u8]) -> Option<String> {
    // (end of the table or array being walked, whether it is an array)
    let mut open: Vec<(usize, bool)> = vec![(bytes.len(), false)];
    let mut r = Reader::new(bytes);
    while let Some(&(end, array)) = open.last() {
        if r.at == end {
            open.pop();
            continue;
        }
        if r.at > end {
            return Some("a header field overruns its table".into());
        }
        if !array {
            let Ok(key) = r.short_string() else { return Some("a header table is cut short".into()) };
            if std::str::from_utf8(key).is_err() {
                return Some(format!("the header name {} is not UTF-8", escape_bytes(key)));
            }
        }
        let Ok(kind) = r.u8() else { return Some("a header table is cut short".into()) };
        let fixed = match kind {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'S' | b'x' | b'F' | b'A' => {
                let Ok(len) = r.u32() else { return Some("a header table is cut short".into()) };
                let inner_end = r.at.saturating_add(len as usize);
                if inner_end > end {
                    return Some("a header field overruns its table".into());
                }
                match kind {
                    b'F' => open.push((inner_end, false)),
                    b'A' => open.push((inner_end, true)),
                    _ => r.at = inner_end,
                }
                continue;
            }
            other => return Some(format!("a header field of unknown type {}", escape_bytes(&[other]))),
        };
        if r.take(fixed).is_err() {
            return Some("a header table is cut short".into());
        }
    }
    None
}

/// `bytes` as text, each byte that is not part of valid UTF-8 written `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

pub(super) fn decode_fields(bytes: &[u8], depth: usize) -> Result<Vec<(Vec<u8>, RawValue)>, RawError> {
    let mut r = Reader::new(bytes);
    let mut fields = Vec::new();
    while !r.is_empty() {
        let key = r.short_string()?.to_vec();
        let value = decode_value(&mut r, depth)?;
        fields.push((key, value));
    }
    Ok(fields)
}

fn decode_value(r: &mut Reader<'_>, depth: usize) -> Result<RawValue, RawError> {
    if depth >= MAX_TABLE_DEPTH {
        return Err(RawError::Protocol("header tables nested too deep"));
    }
    let value = match r.u8()? {
        b't' => RawValue::Bool(r.u8()? != 0),
        b'b' => RawValue::I8(r.u8()? as i8),
        b'B' => RawValue::U8(r.u8()?),
        b's' | b'U' => RawValue::I16(r.u16()? as i16),
        b'u' => RawValue::U16(r.u16()?),
        b'I' => RawValue::I32(r.u32()? as i32),
        b'i' => RawValue::U32(r.u32()?),
        b'l' | b'L' => RawValue::I64(r.u64()? as i64),
        b'f' => RawValue::F32(f32::from_bits(r.u32()?)),
        b'd' => RawValue::F64(f64::from_bits(r.u64()?)),
        b'D' => RawValue::Decimal { scale: r.u8()?, value: r.u32()? },
        b'S' => RawValue::LongString(r.long_string()?.to_vec()),
        b'A' => {
            let mut items = Reader::new(r.long_string()?);
            let mut values = Vec::new();
            while !items.is_empty() {
                values.push(decode_value(&mut items, depth + 1)?);
            }
            RawValue::Array(values)
        }
        b'T' => RawValue::Timestamp(r.u64()?),
        b'F' => RawValue::Table(decode_fields(r.long_string()?, depth + 1)?),
        b'x' => RawValue::Bytes(r.long_string()?.to_vec()),
        b'V' => RawValue::Void,
        _ => return Err(RawError::Protocol("a header field of an unknown type")),
    };
    Ok(value)
}

/// A table's encoded fields (without the length prefix).
pub(super) fn encode_table(fields: &[(Vec<u8>, RawValue)]) -> Vec<u8> {
    let mut w = Writer::default();
    encode_fields(fields, &mut w);
    w.0
}

fn encode_fields(fields: &[(Vec<u8>, RawValue)], w: &mut Writer) {
    for (key, value) in fields {
        w.short_string(key);
        encode_value(value, w);
    }
}

fn encode_value(value: &RawValue, w: &mut Writer) {
    let nested = |w: &mut Writer, fill: &dyn Fn(&mut Writer)| {
        let mut inner = Writer::default();
        fill(&mut inner);
        w.long_string(&inner.0);
    };
    match value {
        RawValue::Bool(v) => {
            w.u8(b't');
            w.u8(u8::from(*v));
        }
        RawValue::I8(v) => {
            w.u8(b'b');
            w.u8(*v as u8);
        }
        RawValue::U8(v) => {
            w.u8(b'B');
            w.u8(*v);
        }
        RawValue::I16(v) => {
            w.u8(b's');
            w.u16(*v as u16);
        }
        RawValue::U16(v) => {
            w.u8(b'u');
            w.u16(*v);
        }
        RawValue::I32(v) => {
            w.u8(b'I');
            w.u32(*v as u32);
        }
        RawValue::U32(v) => {
            w.u8(b'i');
            w.u32(*v);
        }
        RawValue::I64(v) => {
            w.u8(b'l');
            w.u64(*v as u64);
        }
        RawValue::F32(v) => {
            w.u8(b'f');
            w.u32(v.to_bits());
        }
        RawValue::F64(v) => {
            w.u8(b'd');
            w.u64(v.to_bits());
        }
        RawValue::Decimal { scale, value } => {
            w.u8(b'D');
            w.u8(*scale);
            w.u32(*value);
        }
        RawValue::LongString(s) => {
            w.u8(b'S');
            w.long_string(s);
        }
        RawValue::Array(values) => {
            w.u8(b'A');
            nested(w, &|inner| values.iter().for_each(|v| encode_value(v, inner)));
        }
        RawValue::Timestamp(v) => {
            w.u8(b'T');
            w.u64(*v);
        }
        RawValue::Table(fields) => {
            w.u8(b'F');
            nested(w, &|inner| encode_fields(fields, inner));
        }
        RawValue::Bytes(b) => {
            w.u8(b'x');
            w.long_string(b);
        }
        RawValue::Void => w.u8(b'V'),
    }
}

/// Parses a content header payload (as [`content_header`] writes it).
pub fn parse_content_header(payload: &[u8]) -> Result<(u64, RawProperties), RawError> {
    let mut r = Reader::new(payload);
    let (_class, _weight, size) = (r.u16()?, r.u16()?, r.u64()?);
    Ok((size, decode_properties(&mut r)?))
}

impl RawTable {
    /// A table received as `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> RawTable {
        let fields = decode_fields(&bytes, 0).ok();
        RawTable { bytes, fields }
    }

    /// A table to send.
    pub fn from_fields(fields: Vec<(Vec<u8>, RawValue)>) -> RawTable {
        RawTable { bytes: encode_table(&fields), fields: Some(fields) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawProperties {
        RawProperties {
            content_type: Some(b"application/json".to_vec()),
            content_encoding: None,
            headers: Some(RawTable::from_fields(vec![
                (b"plain".to_vec(), RawValue::LongString(b"v".to_vec())),
                (
                    b"\xff\xfe".to_vec(),
                    RawValue::Table(vec![(b"n".to_vec(), RawValue::Array(vec![RawValue::I64(-5), RawValue::Void]))]),
                ),
                (b"d".to_vec(), RawValue::Decimal { scale: 2, value: 12345 }),
                (b"f".to_vec(), RawValue::F64(1.5)),
            ])),
            delivery_mode: Some(2),
            priority: Some(3),
            correlation_id: Some(b"c".to_vec()),
            reply_to: None,
            expiration: Some(b"1".to_vec()),
            message_id: Some(vec![0x80, 0x81, 0x82]),
            timestamp: Some(1_700_000_000),
            kind: None,
            user_id: Some(b"guest".to_vec()),
            app_id: None,
            cluster_id: Some(b"x".to_vec()),
        }
    }

    #[test]
    fn properties_round_trip_with_bytes_that_are_not_utf8() {
        let header = content_header(&sample(), 42);
        assert_eq!(parse_content_header(&header).unwrap(), (42, sample()));
        let empty = RawProperties::default();
        assert_eq!(parse_content_header(&content_header(&empty, 0)).unwrap(), (0, empty));
    }

    #[test]
    fn an_unknown_field_type_or_deep_nesting_keeps_the_table_as_bytes() {
        let unknown = b"\x01kZ\x00".to_vec();
        assert_eq!(RawTable::from_bytes(unknown.clone()).fields, None);
        assert_eq!(table_problem(&unknown).as_deref(), Some("a header field of unknown type Z"));
        let mut deep = RawValue::Void;
        for _ in 0..MAX_TABLE_DEPTH + 1 {
            deep = RawValue::Table(vec![(b"a".to_vec(), deep)]);
        }
        let table = RawTable::from_fields(vec![(b"a".to_vec(), deep)]);
        let received = RawTable::from_bytes(table.bytes.clone());
        assert_eq!((received.fields, received.bytes), (None, table.bytes.clone()));
        assert_eq!(table_problem(&table.bytes), None, "too deep for this decoder, not for lapin's");
    }

    #[test]
    fn lapin_decodable_tables_are_told_from_undecodable_ones_at_any_depth() {
        let mut nested = RawValue::Array(vec![RawValue::Table(vec![(vec![b'k', 0xff], RawValue::Void)])]);
        for _ in 0..1_000 {
            nested = RawValue::Array(vec![nested]);
        }
        let mut w = Writer::default();
        encode_value(&nested, &mut w);
        let mut table = Writer::default();
        table.short_string(b"a");
        table.0.extend_from_slice(&w.0);
        assert_eq!(table_problem(&table.0).as_deref(), Some("the header name k\\xff is not UTF-8"));
        let fine = RawTable::from_fields(vec![(b"ok".to_vec(), RawValue::LongString(vec![0xff]))]);
        assert_eq!(table_problem(&fine.bytes), None, "long strings are bytes for lapin too");
        assert!(table_problem(&fine.bytes[..fine.bytes.len() - 1]).is_some());
        assert_eq!(escape_bytes(b"a\xffb\xc3\xa9"), "a\\xffbé");
    }

    #[test]
    fn truncated_headers_are_errors_not_panics() {
        let header = content_header(&sample(), 42);
        for cut in 0..header.len() {
            assert!(parse_content_header(&header[..cut]).is_err(), "cut at {cut} of {} parsed", header.len());
        }
        let (size, properties) = parse_content_header(&header).expect("the whole header parses");
        assert_eq!((size, properties), (42, sample()));
    }
}
