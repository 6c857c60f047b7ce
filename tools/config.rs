//! One TOML config file for every command: `ferry --config FILE CMD ...`
//! (or `FERRY_CONFIG=FILE`).
//!
//! Each command has a table named after it (`[vm]`, `[receive]`,
//! `[migrate]`, `[demo]`; `[serve.authn]`, `[serve.authz]`, `[pki.init]`),
//! whose keys are the command's long option names (`-` or `_`). A value
//! becomes `--key=value` in front of the command line's own options, and
//! since ferry lets a later option override an earlier one, **the command
//! line wins**. `true` is a bare flag, `false` leaves it out, an array is a
//! comma-separated list. See `ferry.example.toml`.

use std::ffi::OsString;
use std::path::Path;

/// Commands that have subcommands: their table is `[cmd.sub]`.
const NESTED: [&str; 3] = ["pki", "serve", "audit"];

/// `argv` with the options from the config file (if `--config` or
/// `FERRY_CONFIG` names one) inserted right after the command's name.
pub fn args_with_config(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let mut config: Option<OsString> = std::env::var_os("FERRY_CONFIG").filter(|v| !v.is_empty());
    // Where the command path ends: after the first non-option word (and its
    // subcommand word, for nested commands).
    let mut path: Vec<String> = Vec::new();
    let mut insert_at = None;
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy().into_owned();
        if a == "--" {
            break;
        }
        if a == "--config" {
            config = argv.get(i + 1).cloned();
            i += 2;
            continue;
        }
        if let Some(v) = a.strip_prefix("--config=") {
            config = Some(v.into());
        } else if !a.starts_with('-') && insert_at.is_none() {
            path.push(a.clone());
            let nested = NESTED.contains(&path[0].as_str());
            if !nested || path.len() == 2 {
                insert_at = Some(i + 1);
            }
        }
        i += 1;
    }
    let (Some(config), Some(at)) = (config, insert_at) else {
        return Ok(argv);
    };
    let extra = options_for(Path::new(&config), &path)?;
    let mut out = argv;
    let tail = out.split_off(at);
    out.extend(extra.into_iter().map(OsString::from));
    out.extend(tail);
    Ok(out)
}

/// The `--key=value` options the file at `file` gives the command `path`.
pub fn options_for(file: &Path, path: &[String]) -> Result<Vec<String>, String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("cannot read the config file {}: {e}", file.display()))?;
    let doc: toml::Table = text
        .parse()
        .map_err(|e| format!("the config file {} is not valid TOML: {e}", file.display()))?;
    let mut table = Some(&doc);
    for p in path {
        table = table.and_then(|t| t.get(p)).and_then(toml::Value::as_table);
    }
    let Some(table) = table else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let bad = || {
            format!(
                "{}: [{}] {k}: use a string, number, boolean or array of those",
                file.display(),
                path.join(".")
            )
        };
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(n) => Some(n.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            _ => None,
        };
        match v {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
                out.push(format!("{flag}={}", parts.ok_or_else(bad)?.join(",")));
            }
            // A nested command's own table (`[serve.authn]` inside `[serve]`).
            toml::Value::Table(_) => {}
            other => out.push(format!("{flag}={}", scalar(other).ok_or_else(bad)?)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn options_go_right_after_the_command_so_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ferry.toml");
        std::fs::write(
            &f,
            "[vm]\nmemory = \"256MiB\"\nverify = true\nincoming = false\ndirty_rate = 0\n[serve.authn]\nttl-s = 30\n[pki.init]\nhosts = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let c = f.to_str().unwrap();
        let got = args_with_config(args(&["ferry", "-v", "--config", c, "vm", "--memory", "1GiB"])).unwrap();
        assert_eq!(
            got,
            args(&[
                "ferry",
                "-v",
                "--config",
                c,
                "vm",
                "--dirty-rate=0",
                "--memory=256MiB",
                "--verify",
                "--memory",
                "1GiB"
            ])
        );
        let got = args_with_config(args(&["ferry", "serve", "authn", &format!("--config={c}")])).unwrap();
        assert_eq!(got[3], "--ttl-s=30");
        let got = args_with_config(args(&["ferry", "--config", c, "pki", "init"])).unwrap();
        assert_eq!(got[5], "--hosts=a,b");
        // A command the file says nothing about is left alone.
        let plain = args(&["ferry", "--config", c, "status", "--api", "x"]);
        assert_eq!(args_with_config(plain.clone()).unwrap(), plain);
    }

    #[test]
    fn a_bad_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "[vm\nmemory = 1").unwrap();
        let e = args_with_config(args(&["ferry", "--config", f.to_str().unwrap(), "vm"])).unwrap_err();
        assert!(e.contains("not valid TOML"), "{e}");
        let e = args_with_config(args(&["ferry", "--config", "/nonexistent/ferry.toml", "vm"])).unwrap_err();
        assert!(e.contains("cannot read the config file"), "{e}");
    }
}
