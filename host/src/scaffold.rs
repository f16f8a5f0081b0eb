//! `agora new NAME`: a component crate from a template (a router, a
//! migration, a subscriber, using the guest SDK) and its table in
//! plugins.toml, so that `agora up --build` (or `--watch`) builds and serves
//! it at once.
//!
//! The crate goes to `<dir>/<NAME>` beside plugins.toml. Where plugins.toml
//! sits at the root of a Cargo workspace (as in Agora's own repository),
//! the crate is a member of it and shares its `target/` and lock file; the
//! workspace must list it (the `components/*` glob does). Elsewhere it is a
//! workspace of its own. Either way cargo writes the binary under
//! `CARGO_TARGET_DIR` when that is set, and the plugins.toml table says so.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::plugins::Plugins;

const CARGO_TOML: &str = include_str!("scaffold/Cargo.toml.in");
const LIB_RS: &str = include_str!("scaffold/lib.rs.in");
const MIGRATION: &str = include_str!("scaffold/0001_notes.sql.in");
const PLUGINS_TABLE: &str = include_str!("scaffold/plugins.toml.in");

/// What `agora new` is asked to make.
pub struct NewComponent<'a> {
    pub name: &'a str,
    /// plugins.toml, which gets the component's table.
    pub plugins: &'a Path,
    /// Where crates go, relative to plugins.toml's directory.
    pub dir: &'a Path,
    /// The guest SDK crate; by default `<dir>/sdk`.
    pub sdk: Option<&'a Path>,
}

/// What was made.
#[derive(Debug)]
pub struct Made {
    pub crate_dir: PathBuf,
    pub in_workspace: bool,
}

/// Whether `name` can be a crate, a route segment, a table key and a topic
/// prefix at once.
fn check_name(name: &str) -> Result<()> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && name.len() <= 40;
    if !valid {
        bail!(
            "`{name}` cannot name a component: use lowercase letters, digits and `-`, \
             starting with a letter (at most 40)"
        );
    }
    if name == "sdk" {
        bail!("`sdk` is the guest SDK's own crate");
    }
    Ok(())
}

/// `gift-cards` → `GiftCards`.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// `path` relative to `base`, with `/` separators, for a file that others
/// read on their machines (Cargo.toml, plugins.toml).
fn relative(path: &Path, base: &Path) -> PathBuf {
    let path: Vec<_> = path.components().collect();
    let base: Vec<_> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..base.len() {
        out.push("..");
    }
    for part in &path[common..] {
        out.push(part);
    }
    out
}

/// `path` as a TOML string (quoted, escaped).
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.to_string_lossy().into_owned()).to_string()
}

/// `word` as one word of a `sh -c` command line.
fn shell_word(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn render(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_owned(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}"), value)
        })
}

/// Makes the crate and appends the component's table to plugins.toml.
pub fn create(new: &NewComponent) -> Result<Made> {
    let name = new.name;
    check_name(name)?;
    let plugins_text = std::fs::read_to_string(new.plugins)
        .with_context(|| format!("reading {}", new.plugins.display()))?;
    let table: toml::Table = plugins_text
        .parse()
        .with_context(|| format!("{} is not valid TOML", new.plugins.display()))?;
    if table.get("components").and_then(|c| c.get(name)).is_some() {
        bail!("{} already has a component `{name}`", new.plugins.display());
    }
    let base = std::path::absolute(new.plugins)?
        .parent()
        .context("plugins.toml has no directory")?
        .to_owned();
    let crates = base.join(new.dir);
    let crate_dir = crates.join(name);
    if crate_dir.exists() {
        bail!("{} already exists", crate_dir.display());
    }
    let sdk = match new.sdk {
        Some(sdk) => std::path::absolute(sdk)?,
        None => crates.join("sdk"),
    };
    if !sdk.join("Cargo.toml").exists() {
        bail!(
            "the Agora guest SDK is not at {}: run `agora new` beside an Agora project's \
             plugins.toml (with {}/sdk), or pass --sdk",
            sdk.display(),
            new.dir.display()
        );
    }
    let in_workspace = std::fs::read_to_string(base.join("Cargo.toml"))
        .is_ok_and(|manifest| manifest.contains("[workspace]"));

    let type_name = type_name(name);
    let sdk_path = relative(&sdk, &crate_dir);
    let mut manifest = render(
        CARGO_TOML,
        &[("name", name), ("sdk", &toml_string(&sdk_path))],
    );
    if !in_workspace {
        // A workspace of its own, with the profile components build with.
        manifest.push_str(
            "\n[workspace]\n\n[profile.component]\ninherits = \"release\"\nopt-level = \"s\"\nlto = true\nstrip = true\ncodegen-units = 1\n",
        );
    }
    manifest
        .parse::<toml::Table>()
        .context("the crate's Cargo.toml would not parse")?;

    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::path::absolute(PathBuf::from(dir))?,
        None if in_workspace => base.join("target"),
        None => crate_dir.join("target"),
    };
    let wasm = target
        .join("wasm32-wasip2/component")
        .join(format!("{}.wasm", name.replace('-', "_")));
    let wasm = if wasm.starts_with(&base) {
        relative(&wasm, &base)
    } else {
        wasm
    };
    let crate_path = relative(&crate_dir, &base);
    let build = match in_workspace {
        true => format!("cargo build --target wasm32-wasip2 --profile component -p {name}"),
        false => format!(
            "cargo build --manifest-path {} --target wasm32-wasip2 --profile component",
            shell_word(&crate_path.join("Cargo.toml").to_string_lossy())
        ),
    };
    let table = render(
        PLUGINS_TABLE,
        &[
            ("name", name),
            ("wasm", &toml_string(&wasm)),
            ("build", &toml::Value::String(build).to_string()),
            ("dir", &toml_string(&crate_path)),
        ],
    );
    let mut updated = plugins_text;
    if !updated.ends_with('\n') {
        updated.push('\n');
    }
    updated.push_str(&table);
    // Checked as the host will check it, before anything is written: a
    // plugins.toml the host refuses would stop its next reload.
    Plugins::parse(&updated, new.plugins)
        .map_err(|e| anyhow::anyhow!("the new component's table would not load: {e}"))?;

    let written = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(crate_dir.join("src"))?;
        std::fs::create_dir_all(crate_dir.join("migrations"))?;
        std::fs::write(crate_dir.join("Cargo.toml"), &manifest)?;
        std::fs::write(
            crate_dir.join("src/lib.rs"),
            render(LIB_RS, &[("name", name), ("type", &type_name)]),
        )?;
        std::fs::write(crate_dir.join("migrations/0001_notes.sql"), MIGRATION)?;
        std::fs::write(new.plugins, &updated)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&crate_dir);
        return Err(anyhow::Error::new(e).context(format!("writing {}", crate_dir.display())));
    }
    Ok(Made {
        crate_dir,
        in_workspace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_a_crate_a_route_and_a_topic_are_refused() {
        for bad in ["", "Orders", "1st", "gift_cards", "a/b", "x-", "sdk", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["wishlist", "gift-cards", "v2"] {
            check_name(good).unwrap();
        }
        assert_eq!(type_name("gift-cards"), "GiftCards");
    }

    #[test]
    fn paths_are_relative_to_their_reader() {
        assert_eq!(
            relative(
                Path::new("/p/components/sdk"),
                Path::new("/p/components/notes")
            ),
            PathBuf::from("../sdk")
        );
        assert_eq!(
            relative(Path::new("/p/target/x.wasm"), Path::new("/p")),
            PathBuf::from("target/x.wasm")
        );
    }

    #[test]
    fn a_new_component_gets_a_crate_and_a_table_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins.toml");
        std::fs::write(&plugins, "[host]\nlisten = \"127.0.0.1:8080\"").unwrap();
        std::fs::create_dir_all(dir.path().join("components/sdk")).unwrap();
        std::fs::write(dir.path().join("components/sdk/Cargo.toml"), "").unwrap();
        let new = NewComponent {
            name: "gift-cards",
            plugins: &plugins,
            dir: Path::new("components"),
            sdk: None,
        };
        let made = create(&new).unwrap();
        assert!(!made.in_workspace);
        let manifest = std::fs::read_to_string(made.crate_dir.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(r#"agora-sdk = { path = "../sdk" }"#),
            "{manifest}"
        );
        let lib = std::fs::read_to_string(made.crate_dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("impl Service for GiftCards"));
        let config = crate::plugins::Plugins::load(&plugins).unwrap();
        let spec = &config.components["gift-cards"];
        assert_eq!(spec.routes, ["/gift-cards"]);
        assert_eq!(spec.subscribes, ["gift-cards.created"]);
        assert!(spec
            .build
            .as_deref()
            .unwrap()
            .contains("--manifest-path components/gift-cards/Cargo.toml"));
        let err = create(&new).unwrap_err().to_string();
        assert!(
            err.contains("already has a component `gift-cards`"),
            "{err}"
        );
    }

    #[test]
    fn a_component_the_host_would_refuse_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins.toml");
        let before = "[components.old]\nwasm = \"old.wasm\"\nroutes = [\"/notes\"]\n";
        std::fs::write(&plugins, before).unwrap();
        std::fs::create_dir_all(dir.path().join("components/sdk")).unwrap();
        std::fs::write(dir.path().join("components/sdk/Cargo.toml"), "").unwrap();
        for (name, why) in [("notes", "/notes"), ("healthz", "/healthz")] {
            let new = NewComponent {
                name,
                plugins: &plugins,
                dir: Path::new("components"),
                sdk: None,
            };
            let err = format!("{:#}", create(&new).unwrap_err());
            assert!(err.contains("would not load") && err.contains(why), "{err}");
            assert!(!dir.path().join("components").join(name).exists());
        }
        assert_eq!(std::fs::read_to_string(&plugins).unwrap(), before);
    }
}
