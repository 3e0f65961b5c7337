//! The chat template a model ships in `tokenizer_config.json`, rendered with minijinja (a
//! maintained Jinja engine; Hugging Face templates are Jinja written for Python, hence
//! minijinja-contrib's Python-compatible string and list methods).

use std::path::Path;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// A model's chat template, ready to turn a user's message into the model's prompt text.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template of `folder/tokenizer_config.json` (its `default` one where it lists
    /// several), with the special tokens it refers to.
    pub fn from_folder(folder: &Path) -> anyhow::Result<Self> {
        let path = folder.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--chat needs {}", path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let source = match &config["chat_template"] {
            Value::String(template) => template.clone(),
            Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned)
                .with_context(|| format!("{}: no `default` chat template", path.display()))?,
            _ => bail!(
                "{}: no chat_template; this model has no chat format (drop --chat)",
                path.display()
            ),
        };
        // A token is written as a string or as {"content": ...}.
        let token = |key: &str| match &config[key] {
            Value::String(token) => token.clone(),
            Value::Object(token) => token
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            _ => String::new(),
        };
        Ok(Self {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// The prompt text for one user `message`, ending where the assistant's answer starts.
    pub fn render(&self, message: &str) -> anyhow::Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template("chat", &self.source)
            .context("the model's chat template does not parse")?;
        let context = minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => message }],
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        env.get_template("chat")?
            .render(context)
            .context("rendering the model's chat template")
    }
}

/// Today's date as a template asks for it (`strftime_now("%d %b %Y")` in Llama 3.1's):
/// `%d`, `%m`, `%Y`, `%b` and `%B` are filled, anything else is kept.
fn strftime_now(format: String) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_with_python_methods_and_refuses_by_raise_exception() {
        let template = ChatTemplate {
            source: "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
                     {{ raise_exception('bad role') }}{% endif %}<|im_start|>{{ m.role }}\n\
                     {{ m.content.strip() }}<|im_end|>\n{% endfor %}\
                     {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                .into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        };
        assert_eq!(
            template.render("  Hi there ").unwrap(),
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let refusing = ChatTemplate {
            source: "{{ raise_exception('only user turns') }}".into(),
            ..template
        };
        let err = format!("{:#}", refusing.render("x").unwrap_err());
        assert!(err.contains("only user turns"), "{err}");
    }

    #[test]
    fn dates_are_filled_in() {
        let today = strftime_now("%d %b %Y".into());
        assert_eq!(today.len(), 11, "{today}");
        assert!(today[7..].parse::<u32>().unwrap() >= 2024, "{today}");
    }
}
