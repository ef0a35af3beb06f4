//! When the mock calls a tool, in every dialect.
//!
//! A real model calls a tool when the conversation asks for one, not whenever tools are
//! offered: real agents (Claude Code, Codex, openai-agents) offer a dozen tools on every turn,
//! and a mock that always called the first of them would send each agent into its own
//! sub-agent spawning loop. So the mock calls a tool when
//! - `tool_choice` forces one (`required`/`any`, or a named tool), or
//! - the latest user text names an offered tool as a whole word ("use lookup to find it"),
//!
//! and never after the tool answered, unless the `repeat` flag is set: then it calls the tool
//! the user asked for with the same arguments again and again, which is what an agent loop
//! looks like (a turn that names no tool is answered with text, so an agent's side requests,
//! titles and sub-agents, do not loop too).

use super::Behaviour;
use serde_json::{json, Map, Value};

/// A tool the request offers: its name and the JSON schema of its arguments.
pub(crate) struct Offered<'a> {
    pub(crate) name: &'a str,
    pub(crate) schema: Option<&'a Value>,
}

pub(crate) enum Choice<'a> {
    Auto,
    None,
    Required,
    Named(&'a str),
}

/// What one request says about tools, read from its own dialect.
pub(crate) struct ToolAsk<'a> {
    pub(crate) offered: Vec<Offered<'a>>,
    pub(crate) choice: Choice<'a>,
    /// The last turn is a tool's answer.
    pub(crate) answered: bool,
    /// The text of the latest user turn (its last text part).
    pub(crate) user_text: &'a str,
}

impl ToolAsk<'_> {
    /// The call the mock makes, if any: the tool's name and its arguments.
    pub(crate) fn decide(&self, b: &Behaviour) -> Option<(String, Value)> {
        if self.offered.is_empty() || matches!(self.choice, Choice::None) {
            return None;
        }
        if self.answered && !b.has("repeat") {
            return None;
        }
        let named = || {
            self.offered
                .iter()
                .find(|t| names_word(self.user_text, t.name))
        };
        let tool = match self.choice {
            Choice::Named(n) => self.offered.iter().find(|t| t.name == n),
            Choice::Required => named().or(self.offered.first()),
            Choice::Auto => named(),
            Choice::None => None,
        }?;
        // `badargs`: arguments the declared schema refuses (its required fields missing).
        let args = if b.has("badargs") {
            Value::Object(Map::new())
        } else {
            arguments(tool.schema)
        };
        Some((tool.name.to_string(), args))
    }

    /// Chat Completions: `tools[].function`, a `tool` message as the answer.
    pub(crate) fn chat(req: &Value) -> ToolAsk<'_> {
        let offered = list(req, "tools")
            .iter()
            .filter_map(|t| t.get("function"))
            .filter_map(|f| {
                Some(Offered {
                    name: f.get("name")?.as_str()?,
                    schema: f.get("parameters"),
                })
            })
            .collect();
        let choice = match req.get("tool_choice") {
            Some(Value::String(s)) => string_choice(s),
            Some(c) => c
                .pointer("/function/name")
                .and_then(Value::as_str)
                .map_or(Choice::Auto, Choice::Named),
            None => Choice::Auto,
        };
        let messages = list(req, "messages");
        let answered = messages
            .last()
            .and_then(|m| m.get("role"))
            .is_some_and(|r| r == "tool");
        ToolAsk {
            offered,
            choice,
            answered,
            user_text: last_user_text(messages, "content", "text"),
        }
    }

    /// Messages: `tools[].input_schema`, a `tool_result` block as the answer.
    pub(crate) fn messages(req: &Value) -> ToolAsk<'_> {
        let offered = list(req, "tools")
            .iter()
            .filter_map(|t| {
                Some(Offered {
                    name: t.get("name")?.as_str()?,
                    schema: t.get("input_schema"),
                })
            })
            .collect();
        let choice = match req.pointer("/tool_choice/type").and_then(Value::as_str) {
            Some("none") => Choice::None,
            Some("any") => Choice::Required,
            Some("tool") => req
                .pointer("/tool_choice/name")
                .and_then(Value::as_str)
                .map_or(Choice::Required, Choice::Named),
            _ => Choice::Auto,
        };
        let messages = list(req, "messages");
        let answered = messages
            .last()
            .and_then(|m| m.get("content"))
            .and_then(Value::as_array)
            .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_result"));
        ToolAsk {
            offered,
            choice,
            answered,
            user_text: last_user_text(messages, "content", "text"),
        }
    }

    /// Responses: flat `tools[]` of type `function`, a `function_call_output` item as the
    /// answer; `input` is a string or a list of items.
    pub(crate) fn responses(req: &Value) -> ToolAsk<'_> {
        let offered = list(req, "tools")
            .iter()
            .filter(|t| t["type"] == "function")
            .filter_map(|t| {
                Some(Offered {
                    name: t.get("name")?.as_str()?,
                    schema: t.get("parameters"),
                })
            })
            .collect();
        let choice = match req.get("tool_choice") {
            Some(Value::String(s)) => string_choice(s),
            Some(c) => c
                .get("name")
                .and_then(Value::as_str)
                .map_or(Choice::Auto, Choice::Named),
            None => Choice::Auto,
        };
        let (answered, user_text) = match req.get("input") {
            Some(Value::String(s)) => (false, s.as_str()),
            Some(Value::Array(items)) => (
                items
                    .last()
                    .is_some_and(|i| i["type"] == "function_call_output"),
                last_user_text(items, "content", "text"),
            ),
            _ => (false, ""),
        };
        ToolAsk {
            offered,
            choice,
            answered,
            user_text,
        }
    }
}

fn list<'a>(v: &'a Value, field: &str) -> &'a [Value] {
    v.get(field)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn string_choice(s: &str) -> Choice<'static> {
    match s {
        "none" => Choice::None,
        "required" => Choice::Required,
        _ => Choice::Auto,
    }
}

/// The last text part of the latest user turn that has one: agents put their own reminders
/// before the user's words in the same turn.
fn last_user_text<'a>(turns: &'a [Value], content: &str, text: &str) -> &'a str {
    turns
        .iter()
        .rev()
        .filter(|t| t.get("role").is_some_and(|r| r == "user"))
        .find_map(|t| match t.get(content)? {
            Value::String(s) => Some(s.as_str()),
            Value::Array(parts) => parts.iter().rev().find_map(|p| p.get(text)?.as_str()),
            _ => None,
        })
        .unwrap_or("")
}

/// `name` appears in `text` with no identifier character on either side.
fn names_word(text: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(name).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Arguments from the schema: every required string is "mock", numbers 1, booleans true,
/// arrays and objects empty, so the call validates against what the agent declared.
pub(crate) fn arguments(schema: Option<&Value>) -> Value {
    let mut args = Map::new();
    let props = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object);
    for name in schema
        .and_then(|s| s.get("required"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let prop = props.and_then(|p| p.get(name));
        // A schema that names its value (`const`, `default`, the first of `enum` or
        // `examples`) gets that value: how a test scripts the arguments a model sends.
        let named = prop.and_then(|p| {
            p.get("const")
                .or_else(|| p.get("default"))
                .or_else(|| p.pointer("/enum/0"))
                .or_else(|| p.pointer("/examples/0"))
        });
        if let Some(v) = named {
            args.insert(name.to_string(), v.clone());
            continue;
        }
        let ty = prop.and_then(|p| p.get("type")).and_then(Value::as_str);
        let v = match ty {
            Some("number" | "integer") => json!(1),
            Some("boolean") => json!(true),
            Some("array") => json!([]),
            Some("object") => json!({}),
            _ => json!("mock"),
        };
        args.insert(name.to_string(), v);
    }
    Value::Object(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn plain() -> Behaviour {
        Behaviour::from("mock", &HeaderMap::new())
    }

    #[test]
    fn a_tool_is_called_when_named_or_forced_never_merely_offered() {
        let tools = json!([{"type": "function", "function": {"name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]);
        let ask = |text: &str, choice: Value| json!({"tools": tools, "tool_choice": choice, "messages": [{"role": "user", "content": text}]});
        let b = plain();
        assert!(ToolAsk::chat(&ask("say hello", json!("auto")))
            .decide(&b)
            .is_none());
        assert!(ToolAsk::chat(&ask("lookups are fun", json!("auto")))
            .decide(&b)
            .is_none());
        let (name, args) = ToolAsk::chat(&ask("use lookup, please", json!("auto")))
            .decide(&b)
            .unwrap();
        assert_eq!((name.as_str(), args), ("lookup", json!({"q": "mock"})));
        assert!(ToolAsk::chat(&ask("hi", json!("required")))
            .decide(&b)
            .is_some());
        assert!(ToolAsk::chat(&ask("use lookup", json!("none")))
            .decide(&b)
            .is_none());
    }

    #[test]
    fn a_schema_that_names_a_value_gets_it() {
        let schema = json!({"type": "object", "required": ["a", "b", "c", "d", "e"], "properties": {
            "a": {"type": "string", "const": "@victim"}, "b": {"type": "string", "enum": ["x", "y"]},
            "c": {"type": "integer", "default": 7}, "d": {"type": "string", "examples": ["e.g."]},
            "e": {"type": "string"}}});
        assert_eq!(
            arguments(Some(&schema)),
            json!({"a": "@victim", "b": "x", "c": 7, "d": "e.g.", "e": "mock"})
        );
    }

    #[test]
    fn after_the_answer_only_repeat_calls_again() {
        let req = json!({"tools": [{"name": "ls", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "reminder"}, {"type": "text", "text": "run ls"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "ls", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "a b"}]}]});
        assert!(ToolAsk::messages(&req).decide(&plain()).is_none());
        let repeat = Behaviour::from("mock-repeat", &HeaderMap::new());
        assert_eq!(ToolAsk::messages(&req).decide(&repeat).unwrap().0, "ls");
        let unnamed =
            json!({"tools": req["tools"], "messages": [{"role": "user", "content": "hi"}]});
        assert!(ToolAsk::messages(&unnamed).decide(&repeat).is_none());
    }
}
