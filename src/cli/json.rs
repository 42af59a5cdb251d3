//! JSON helpers: non-finite numbers become the strings "NaN", "Infinity", "-Infinity".

use serde_json::{Map, Value};

/// A number as JSON, with non-finite values as strings.
pub fn num(x: f64) -> Value {
    if x.is_nan() {
        Value::String("NaN".into())
    } else if x.is_infinite() {
        Value::String(if x > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// A JSON object builder.
#[derive(Default)]
pub struct Obj(pub Map<String, Value>);

impl Obj {
    pub fn set(mut self, k: &str, v: impl Into<Value>) -> Self {
        self.0.insert(k.into(), v.into());
        self
    }
    pub fn num(self, k: &str, x: f64) -> Self {
        self.set(k, num(x))
    }
    pub fn line(&self) -> String {
        Value::Object(self.0.clone()).to_string()
    }

    /// Prints one JSON line (`--json`) or `key: value` lines for people.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.line());
        } else {
            for (k, v) in &self.0 {
                println!("{k}: {v}");
            }
        }
    }
}
