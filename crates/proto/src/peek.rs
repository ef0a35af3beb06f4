//! A borrowed look at the top level of a JSON request body.
//!
//! The gateway needs a handful of top-level fields (model, stream, max_tokens, metadata) and
//! sometimes must change one or two of them. Parsing the whole body into a `Value` and
//! re-encoding it would cost an allocation per node and could reorder or re-format fields the
//! gateway has no business touching, so the top level is split into `(key, raw value)` pairs
//! that borrow from the original bytes; nested content is copied through verbatim.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

#[derive(Debug, PartialEq, Eq)]
pub enum PeekError {
    /// The body is not JSON, or not a JSON object.
    Malformed(String),
    /// A field has the wrong type; names the field.
    Field {
        field: &'static str,
        expected: &'static str,
    },
}

impl fmt::Display for PeekError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeekError::Malformed(m) => write!(f, "request body is not a valid JSON object: {m}"),
            PeekError::Field { field, expected } => write!(f, "'{field}' must be {expected}"),
        }
    }
}

impl std::error::Error for PeekError {}

/// Top-level `(key, raw value)` pairs in document order.
type Fields<'a> = Vec<(Cow<'a, str>, Cow<'a, RawValue>)>;

pub struct RequestDoc<'a> {
    fields: Fields<'a>,
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let value: &'de RawValue = map.next_value()?;
            // A repeated key keeps the last value, as serde_json and most servers do.
            if let Some(slot) = out
                .iter_mut()
                .find(|(k, _): &&mut (Cow<str>, Cow<RawValue>)| *k == key)
            {
                slot.1 = Cow::Borrowed(value);
            } else {
                out.push((key, Cow::Borrowed(value)));
            }
        }
        Ok(out)
    }
}

fn parse_fields<'a>(body: &'a [u8]) -> Result<Fields<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let fields = (&mut de).deserialize_map(FieldsVisitor)?;
    de.end()?;
    Ok(fields)
}

impl<'a> RequestDoc<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, PeekError> {
        let fields = parse_fields(body).map_err(|e| PeekError::Malformed(e.to_string()))?;
        Ok(RequestDoc { fields })
    }

    pub fn raw(&self, name: &str) -> Option<&RawValue> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    fn typed<T: de::DeserializeOwned>(
        &self,
        name: &'static str,
        expected: &'static str,
    ) -> Result<Option<T>, PeekError> {
        match self.raw(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| PeekError::Field {
                    field: name,
                    expected,
                }),
        }
    }

    /// The `model` field. Required by every dialect tollgate serves.
    pub fn model(&self) -> Result<Option<String>, PeekError> {
        self.typed("model", "a string")
    }

    pub fn stream(&self) -> Result<bool, PeekError> {
        Ok(self.typed::<bool>("stream", "a boolean")?.unwrap_or(false))
    }

    /// Whether the client itself asked for the usage chunk in a stream.
    pub fn client_wants_stream_usage(&self) -> bool {
        #[derive(serde::Deserialize)]
        struct StreamOptions {
            #[serde(default)]
            include_usage: Option<bool>,
        }
        matches!(
            self.typed::<StreamOptions>("stream_options", "an object"),
            Ok(Some(StreamOptions {
                include_usage: Some(true)
            }))
        )
    }

    /// `max_completion_tokens` wins over the deprecated `max_tokens`, as at OpenAI.
    pub fn max_output_tokens(&self) -> Result<Option<u64>, PeekError> {
        Ok(self.max_output_field()?.map(|(_, v)| v))
    }

    /// The output cap and the field it came from: `max_completion_tokens` (Chat), then
    /// `max_tokens` (Chat, Messages), then `max_output_tokens` (Responses).
    pub fn max_output_field(&self) -> Result<Option<(&'static str, u64)>, PeekError> {
        for field in ["max_completion_tokens", "max_tokens", "max_output_tokens"] {
            if let Some(v) = self.typed::<u64>(field, "a non-negative integer")? {
                return Ok(Some((field, v)));
            }
        }
        Ok(None)
    }

    /// String-valued entries of `metadata`, used as attribution tags. Other value types are
    /// ignored rather than refused: `metadata` belongs to the provider's API, not to us.
    pub fn metadata_tags(&self) -> Vec<(String, String)> {
        let Some(raw) = self.raw("metadata") else {
            return Vec::new();
        };
        let Ok(map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get())
        else {
            return Vec::new();
        };
        map.into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect()
    }

    /// Replaces or appends a top-level field with an already-encoded JSON value.
    pub fn set_raw(&mut self, name: &str, json: String) -> Result<(), PeekError> {
        let value = RawValue::from_string(json).map_err(|e| PeekError::Malformed(e.to_string()))?;
        if let Some(slot) = self.fields.iter_mut().find(|(k, _)| k == name) {
            slot.1 = Cow::Owned(value);
        } else {
            self.fields
                .push((Cow::Owned(name.to_owned()), Cow::Owned(value)));
        }
        Ok(())
    }

    pub fn set_str(&mut self, name: &str, value: &str) -> Result<(), PeekError> {
        let json = serde_json::to_string(value).map_err(|e| PeekError::Malformed(e.to_string()))?;
        self.set_raw(name, json)
    }

    /// Makes an upstream stream end with a usage chunk, keeping any other `stream_options`.
    pub fn force_stream_usage(&mut self) -> Result<(), PeekError> {
        let mut opts = match self.raw("stream_options") {
            Some(raw) if raw.get() != "null" => {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get())
                    .map_err(|_| PeekError::Field {
                        field: "stream_options",
                        expected: "an object",
                    })?
            }
            _ => serde_json::Map::new(),
        };
        opts.insert("include_usage".into(), serde_json::Value::Bool(true));
        let json = serde_json::to_string(&opts).map_err(|e| PeekError::Malformed(e.to_string()))?;
        self.set_raw("stream_options", json)
    }

    pub fn remove(&mut self, name: &str) {
        self.fields.retain(|(k, _)| k != name);
    }

    /// Re-assembles the body. Keys are re-escaped; values are the original bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let cap = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + 2;
        let mut out = Vec::with_capacity(cap);
        out.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Writing a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, k.as_ref());
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        out
    }

    /// All text a tokenizer should see when the provider reports no usage: every string
    /// inside `messages` / `input` / `prompt` / `tools`, joined.
    pub fn text_for_estimate(&self) -> String {
        let mut out = String::new();
        for name in [
            "messages",
            "input",
            "prompt",
            "system",
            "tools",
            "instructions",
        ] {
            if let Some(raw) = self.raw(name) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(raw.get()) {
                    collect_strings(&v, &mut out);
                }
            }
        }
        out
    }
}

fn collect_strings(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        serde_json::Value::Object(m) => m.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_nested_bytes_survive_a_patch() {
        let body = br#"{"model":"alias","messages":[{"role":"user","content":"h\u00e9 {\"x\":1}"}],"x_vendor":{"a":[1, 2 ,3]},"stream":true}"#;
        let mut doc = RequestDoc::parse(body).unwrap();
        assert_eq!(doc.model().unwrap().as_deref(), Some("alias"));
        assert!(doc.stream().unwrap());
        doc.set_str("model", "gpt-4o-mini").unwrap();
        doc.force_stream_usage().unwrap();
        let out = String::from_utf8(doc.to_vec()).unwrap();
        assert_eq!(
            out,
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"h\u00e9 {\"x\":1}"}],"x_vendor":{"a":[1, 2 ,3]},"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn stream_options_are_merged_not_replaced() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#;
        let mut doc = RequestDoc::parse(body).unwrap();
        assert!(!doc.client_wants_stream_usage());
        doc.force_stream_usage().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&doc.to_vec()).unwrap();
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn malformed_and_mistyped_bodies_are_refused() {
        assert!(matches!(
            RequestDoc::parse(b"{\"model\":"),
            Err(PeekError::Malformed(_))
        ));
        assert!(matches!(
            RequestDoc::parse(b"[1,2]"),
            Err(PeekError::Malformed(_))
        ));
        assert!(matches!(
            RequestDoc::parse(b"{} trailing"),
            Err(PeekError::Malformed(_))
        ));
        let doc = RequestDoc::parse(br#"{"model":5,"stream":"yes","max_tokens":-1}"#).unwrap();
        assert_eq!(
            doc.model(),
            Err(PeekError::Field {
                field: "model",
                expected: "a string"
            })
        );
        assert!(doc.stream().is_err());
        assert!(doc.max_output_tokens().is_err());
    }

    #[test]
    fn escaped_keys_and_duplicates() {
        let doc = RequestDoc::parse(br#"{"mo\u0064el":"a","model":"b"}"#).unwrap();
        assert_eq!(doc.model().unwrap().as_deref(), Some("b"));
        assert_eq!(doc.to_vec(), br#"{"model":"b"}"#.to_vec());
    }

    #[test]
    fn metadata_tags_take_strings_only() {
        let doc = RequestDoc::parse(br#"{"metadata":{"run":"r1","n":3,"env":"prod"}}"#).unwrap();
        let mut tags = doc.metadata_tags();
        tags.sort();
        assert_eq!(
            tags,
            vec![("env".into(), "prod".into()), ("run".into(), "r1".into())]
        );
    }

    #[test]
    fn max_completion_tokens_wins() {
        let doc = RequestDoc::parse(br#"{"max_tokens":10,"max_completion_tokens":20}"#).unwrap();
        assert_eq!(doc.max_output_tokens().unwrap(), Some(20));
    }
}
