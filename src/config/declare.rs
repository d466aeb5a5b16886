//! The `settings!` macro: each setting is declared once, and its struct field,
//! its default, its override flag and the line that applies the flag all come
//! from that one declaration, so they cannot drift apart.
//!
//! ```text
//! settings! {
//!     /// Doc of the section struct.
//!     pub struct MemberSettings in members {
//!         /// Doc of the field (rustdoc; the TOML file documents the key).
//!         enabled: bool = true,
//!             flag members_enabled, env "FGP_MEMBERS_ENABLED",
//!             help "Handle member PATCHes in the proxy";
//!         /// A key with no flag: only the file sets it.
//!         jwt: JwtSettings = JwtSettings::default();
//!     }
//!     pub struct JwtSettings in auth.jwt { ... }
//! }
//! ```
//!
//! For every section this makes the struct (`Debug, Clone, Deserialize,
//! Serialize`, `deny_unknown_fields`, missing keys taking the default) and its
//! `Default`. `in` names where the section sits in [`super::Config`]; the
//! flag's help gets that path and the key appended, e.g.
//! `... [members.enabled]`. Attributes before a field (`#[serde(...)]`, docs)
//! go on the struct field; `arg(...)` after the env var adds clap attributes
//! to the flag, e.g. `arg(hide_env_values = true)` or `arg(value_delimiter =
//! ',')`.
//!
//! All sections are declared in one invocation because one `Overrides` struct
//! holds every flag; flags are listed in `--help` in declaration order.
//! Flag and env names are written out, not derived from the key (macro_rules
//! cannot build identifiers), so that grepping for either finds its
//! declaration; a test checks that they follow the key.

macro_rules! settings {
    (
        $(
            $(#[$section_attr:meta])*
            pub struct $section:ident in $($path:ident).+ {
                $(
                    $(#[$field_attr:meta])*
                    $field:ident : $ty:ty = $default:expr
                    $(, flag $flag:ident, env $env:literal $(, arg($($arg:tt)*))?, help $help:literal)?
                    ;
                )*
            }
        )*
    ) => {
        $(
            $(#[$section_attr])*
            #[derive(Debug, Clone, ::serde::Deserialize, ::serde::Serialize)]
            #[serde(deny_unknown_fields, default)]
            pub struct $section {
                $(
                    $(#[$field_attr])*
                    pub $field: $ty,
                )*
            }

            impl Default for $section {
                fn default() -> Self {
                    Self {
                        $($field: $default,)*
                    }
                }
            }

            impl $section {
                fn apply_overrides(&mut self, overrides: &Overrides) {
                    $($(
                        if let Some(value) = &overrides.$flag {
                            self.$field = value.clone();
                        }
                    )?)*
                }
            }
        )*

        impl Overrides {
            /// Sets every key whose flag or environment variable was given.
            pub(crate) fn apply_to(&self, config: &mut $crate::config::Config) {
                $(config.$($path).+.apply_overrides(self);)*
            }
        }

        // The key's path is needed inside each flag's help, one repetition
        // deeper than macro_rules allows using it: it is turned into a
        // string here and handed on.
        settings!(@overrides
            $(
                (stringify!($($path).+))
                [$($($flag: $ty, $env, ($($($arg)*)?), $help, $field;)?)*]
            )*
        );
    };

    (@overrides
        $(
            ($path:expr)
            [$($flag:ident: $ty:ty, $env:literal, ($($arg:tt)*), $help:literal, $field:ident;)*]
        )*
    ) => {
        /// Values from the environment or the command line that win over the file.
        /// Each field maps to exactly one key of [`Config`](super::Config).
        #[derive(Debug, Clone, Default, ::clap::Args)]
        pub struct Overrides {
            $($(
                #[arg(
                    long,
                    env = $env,
                    global = true,
                    help = concat!($help, " [", $path, ".", stringify!($field), "]"),
                    $($arg)*
                )]
                pub $flag: Option<$ty>,
            )*)*
        }
    };
}

pub(crate) use settings;
