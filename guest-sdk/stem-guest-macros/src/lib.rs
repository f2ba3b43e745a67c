//! The `#[task]` attribute of `stem-guest`. Use it through `stem_guest::task`.
//!
//! The attribute leaves the function as written and adds, beside it, a registration that a
//! static constructor runs when the component starts: the task's name, its default options
//! (validated here, at compile time, with errors pointing at the offending option) and a
//! wrapper that decodes JSON arguments and encodes the result.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, MetaNameValue, Token};

/// Declares a Stem task. See the `stem-guest` crate documentation.
///
/// Options: `name = "..."` (defaults to the function name), `queue = "..."`, `priority = 0..=9`,
/// `max_retries = N`, `retry_backoff = "2s"`, `retry_backoff_max = "5m"`, `retry_jitter = bool`,
/// `soft_time_limit = "10s"`, `time_limit = "30s"`, `rate_limit = "10/s"`,
/// `memory_limit = "64MiB"`, `args_encoder = "gzip"`, `result_encoder = "base64"`. Durations
/// take `ms`, `s`, `m` or `h`; sizes take `B`, `KiB`, `MiB` or `GiB`. Capabilities the task
/// needs (granted separately by an operator): `outbound = ["https://api.example.com"]`,
/// `secrets = ["SMTP_PASSWORD"]`, `dirs = ["/data/in:ro"]`. The function's doc comment becomes
/// the task's description.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

#[derive(Default)]
struct Options {
    name: Option<String>,
    queue: Option<String>,
    priority: Option<u8>,
    max_retries: Option<u32>,
    retry_backoff_ms: Option<u64>,
    retry_backoff_max_ms: Option<u64>,
    retry_jitter: Option<bool>,
    soft_time_limit_ms: Option<u64>,
    hard_time_limit_ms: Option<u64>,
    rate_limit: Option<String>,
    memory_limit_bytes: Option<u64>,
    args_encoder: Option<String>,
    result_encoder: Option<String>,
    outbound: Vec<String>,
    secrets: Vec<String>,
    dirs: Vec<String>,
}

fn expand(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let function: ItemFn = syn::parse2(item)?;
    let options = parse_options(attr)?;
    let fn_name = &function.sig.ident;
    let task_name = options.name.clone().unwrap_or_else(|| fn_name.to_string());

    let call = match function.sig.inputs.len() {
        1 => quote! { |args| #fn_name(args) },
        2 => quote! { |args| #fn_name(ctx, args) },
        _ => {
            return Err(syn::Error::new(
                function.sig.inputs.span(),
                "a task takes `(ctx: &TaskContext, args: T)` or `(args: T)` where T: Deserialize",
            ));
        }
    };
    if let Some(FnArg::Receiver(receiver)) = function.sig.inputs.first() {
        return Err(syn::Error::new(
            receiver.span(),
            "a task is a free function, not a method",
        ));
    }
    if function.sig.asyncness.is_some() {
        return Err(syn::Error::new(
            function.sig.asyncness.span(),
            "tasks are synchronous functions",
        ));
    }

    let description = doc_comment(&function);
    let description = match description {
        Some(text) => quote! { ::core::option::Option::Some(#text) },
        None => quote! { ::core::option::Option::None },
    };
    let opt_str = |value: &Option<String>| match value {
        Some(v) => quote! { ::core::option::Option::Some(#v) },
        None => quote! { ::core::option::Option::None },
    };
    let opt_num = |value: Option<u64>| match value {
        Some(v) => quote! { ::core::option::Option::Some(#v) },
        None => quote! { ::core::option::Option::None },
    };
    let queue = opt_str(&options.queue);
    let rate_limit = opt_str(&options.rate_limit);
    let args_encoder = opt_str(&options.args_encoder);
    let result_encoder = opt_str(&options.result_encoder);
    let priority = match options.priority {
        Some(v) => quote! { ::core::option::Option::Some(#v) },
        None => quote! { ::core::option::Option::None },
    };
    let max_retries = match options.max_retries {
        Some(v) => quote! { ::core::option::Option::Some(#v) },
        None => quote! { ::core::option::Option::None },
    };
    let retry_jitter = match options.retry_jitter {
        Some(v) => quote! { ::core::option::Option::Some(#v) },
        None => quote! { ::core::option::Option::None },
    };
    let retry_backoff_ms = opt_num(options.retry_backoff_ms);
    let retry_backoff_max_ms = opt_num(options.retry_backoff_max_ms);
    let soft_time_limit_ms = opt_num(options.soft_time_limit_ms);
    let hard_time_limit_ms = opt_num(options.hard_time_limit_ms);
    let memory_limit_bytes = opt_num(options.memory_limit_bytes);
    let outbound = &options.outbound;
    let secrets = &options.secrets;
    let dirs = &options.dirs;

    let register = format_ident!("__stem_register_{}", fn_name);
    let run = format_ident!("__stem_run_{}", fn_name);

    Ok(quote! {
        #function

        #[doc(hidden)]
        #[allow(non_snake_case)]
        const _: () = {
            fn #run(
                ctx: &::stem_guest::TaskContext,
                args: &str,
            ) -> ::core::result::Result<::std::string::String, ::stem_guest::TaskError> {
                let _ = ctx;
                ::stem_guest::__private::invoke(#task_name, args, #call)
            }

            extern "C" fn #register() {
                ::stem_guest::__private::register(::stem_guest::__private::TaskEntry {
                    name: #task_name,
                    description: #description,
                    options: ::stem_guest::__private::StaticOptions {
                        queue: #queue,
                        priority: #priority,
                        max_retries: #max_retries,
                        retry_backoff_ms: #retry_backoff_ms,
                        retry_backoff_max_ms: #retry_backoff_max_ms,
                        retry_jitter: #retry_jitter,
                        soft_time_limit_ms: #soft_time_limit_ms,
                        hard_time_limit_ms: #hard_time_limit_ms,
                        rate_limit: #rate_limit,
                        memory_limit_bytes: #memory_limit_bytes,
                        args_encoder: #args_encoder,
                        result_encoder: #result_encoder,
                        outbound: &[#(#outbound),*],
                        secrets: &[#(#secrets),*],
                        dirs: &[#(#dirs),*],
                    },
                    run: #run,
                });
            }

            // The component runs `.init_array` constructors before its first export call.
            #[used]
            #[unsafe(link_section = ".init_array")]
            static REGISTER: extern "C" fn() = #register;
        };
    })
}

fn parse_options(attr: TokenStream2) -> syn::Result<Options> {
    let mut options = Options::default();
    let pairs = Punctuated::<MetaNameValue, Token![,]>::parse_terminated.parse2(attr)?;
    for pair in pairs {
        let key = pair
            .path
            .get_ident()
            .map(|ident| ident.to_string())
            .ok_or_else(|| syn::Error::new(pair.path.span(), "expected an option name"))?;
        let span = pair.value.span();
        match key.as_str() {
            "name" => options.name = Some(non_empty(string(&pair.value)?, span)?),
            "queue" => options.queue = Some(non_empty(string(&pair.value)?, span)?),
            "priority" => {
                let value = integer(&pair.value)?;
                if value > 9 {
                    return Err(syn::Error::new(
                        span,
                        "priority is 0 (lowest) to 9 (highest)",
                    ));
                }
                options.priority = Some(value as u8);
            }
            "max_retries" => {
                let value = integer(&pair.value)?;
                options.max_retries = Some(
                    u32::try_from(value)
                        .map_err(|_| syn::Error::new(span, "max_retries is too large"))?,
                );
            }
            "retry_backoff" => options.retry_backoff_ms = Some(duration_ms(&pair.value)?),
            "retry_backoff_max" => options.retry_backoff_max_ms = Some(duration_ms(&pair.value)?),
            "retry_jitter" => options.retry_jitter = Some(boolean(&pair.value)?),
            "soft_time_limit" => options.soft_time_limit_ms = Some(duration_ms(&pair.value)?),
            "time_limit" => options.hard_time_limit_ms = Some(duration_ms(&pair.value)?),
            "rate_limit" => {
                let value = string(&pair.value)?;
                check_rate_limit(&value, span)?;
                options.rate_limit = Some(value);
            }
            "memory_limit" => options.memory_limit_bytes = Some(size_bytes(&pair.value)?),
            "args_encoder" => options.args_encoder = Some(non_empty(string(&pair.value)?, span)?),
            "result_encoder" => {
                options.result_encoder = Some(non_empty(string(&pair.value)?, span)?)
            }
            "outbound" => {
                for (pattern, span) in strings(&pair.value)? {
                    check_outbound(&pattern, span)?;
                    options.outbound.push(pattern);
                }
            }
            "secrets" => {
                for (name, span) in strings(&pair.value)? {
                    check_secret(&name, span)?;
                    options.secrets.push(name);
                }
            }
            "dirs" => {
                for (dir, span) in strings(&pair.value)? {
                    check_dir(&dir, span)?;
                    options.dirs.push(dir);
                }
            }
            other => {
                return Err(syn::Error::new(
                    pair.path.span(),
                    format!(
                        "unknown task option `{other}`; expected one of: name, queue, priority, \
                         max_retries, retry_backoff, retry_backoff_max, retry_jitter, \
                         soft_time_limit, time_limit, rate_limit, memory_limit, args_encoder, \
                         result_encoder, outbound, secrets, dirs"
                    ),
                ));
            }
        }
    }
    if let (Some(soft), Some(hard)) = (options.soft_time_limit_ms, options.hard_time_limit_ms)
        && soft > hard
    {
        return Err(syn::Error::new(
            Span::call_site(),
            "soft_time_limit must not exceed time_limit",
        ));
    }
    Ok(options)
}

fn doc_comment(function: &ItemFn) -> Option<String> {
    let lines: Vec<String> = function
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("doc"))
        .filter_map(|attr| match &attr.meta {
            syn::Meta::NameValue(MetaNameValue {
                value:
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(text),
                        ..
                    }),
                ..
            }) => Some(text.value().trim().to_string()),
            _ => None,
        })
        .collect();
    let text = lines.join(" ").trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn literal(value: &Expr) -> Option<&Lit> {
    match value {
        Expr::Lit(ExprLit { lit, .. }) => Some(lit),
        _ => None,
    }
}

fn string(value: &Expr) -> syn::Result<String> {
    match literal(value) {
        Some(Lit::Str(text)) => Ok(text.value()),
        _ => Err(syn::Error::new(value.span(), "expected a string literal")),
    }
}

/// `["a", "b"]`: each string with its span.
fn strings(value: &Expr) -> syn::Result<Vec<(String, Span)>> {
    let Expr::Array(array) = value else {
        return Err(syn::Error::new(
            value.span(),
            "expected a list of string literals, e.g. [\"a\", \"b\"]",
        ));
    };
    array
        .elems
        .iter()
        .map(|element| Ok((string(element)?, element.span())))
        .collect()
}

/// `Ok` when `valid`, else an error at `span`.
fn ensure(valid: bool, span: Span, message: impl FnOnce() -> String) -> syn::Result<()> {
    if valid {
        Ok(())
    } else {
        Err(syn::Error::new(span, message()))
    }
}

/// The shape the host checks again at upload: `scheme://host[:port]`, no path.
fn check_outbound(pattern: &str, span: Span) -> syn::Result<()> {
    let valid = pattern.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https" | "*")
            && !rest.is_empty()
            && !rest
                .trim_end_matches('/')
                .contains(['/', '?', '#', '@', ' '])
    });
    ensure(valid, span, || {
        format!(
            "`{pattern}` is not an outbound pattern; write `scheme://host[:port]`, e.g. \
             \"https://api.example.com\", \"http://127.0.0.1:*\" or \"https://*.example.com\""
        )
    })
}

fn check_secret(name: &str, span: Span) -> syn::Result<()> {
    let mut chars = name.chars();
    let valid = name.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    ensure(valid, span, || {
        format!("`{name}` is not a secret name: use letters, digits and `_`")
    })
}

fn check_dir(dir: &str, span: Span) -> syn::Result<()> {
    let valid = dir.rsplit_once(':').is_some_and(|(path, mode)| {
        path.starts_with('/')
            && matches!(mode, "ro" | "rw")
            && !path.contains(':')
            && (path == "/"
                || path[1..]
                    .split('/')
                    .all(|part| !part.is_empty() && part != "." && part != ".."))
    });
    ensure(valid, span, || {
        format!(
            "`{dir}` is not a directory; write an absolute path and a mode, e.g. \"/data/in:ro\""
        )
    })
}

fn non_empty(value: String, span: Span) -> syn::Result<String> {
    if value.trim().is_empty() {
        Err(syn::Error::new(span, "must not be empty"))
    } else {
        Ok(value)
    }
}

fn integer(value: &Expr) -> syn::Result<u64> {
    match literal(value) {
        Some(Lit::Int(number)) => number.base10_parse(),
        _ => Err(syn::Error::new(value.span(), "expected an integer literal")),
    }
}

fn boolean(value: &Expr) -> syn::Result<bool> {
    match literal(value) {
        Some(Lit::Bool(flag)) => Ok(flag.value),
        _ => Err(syn::Error::new(value.span(), "expected `true` or `false`")),
    }
}

/// Splits "250ms" into (250, "ms").
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number = text[..digits].parse().ok()?;
    Some((number, text[digits..].trim()))
}

fn duration_ms(value: &Expr) -> syn::Result<u64> {
    let text = string(value)?;
    let error = || {
        syn::Error::new(
            value.span(),
            format!("`{text}` is not a duration; write e.g. \"500ms\", \"30s\", \"5m\" or \"1h\""),
        )
    };
    let (number, unit) = number_and_unit(&text).ok_or_else(error)?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(error()),
    };
    number.checked_mul(factor).ok_or_else(error)
}

fn size_bytes(value: &Expr) -> syn::Result<u64> {
    let text = string(value)?;
    let error = || {
        syn::Error::new(
            value.span(),
            format!("`{text}` is not a size; write e.g. \"512KiB\", \"64MiB\" or \"1GiB\""),
        )
    };
    let (number, unit) = number_and_unit(&text).ok_or_else(error)?;
    let factor = match unit {
        "B" | "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(error()),
    };
    number.checked_mul(factor).ok_or_else(error)
}

fn check_rate_limit(text: &str, span: Span) -> syn::Result<()> {
    let valid = text.split_once('/').is_some_and(|(count, per)| {
        count.trim().parse::<u32>().is_ok_and(|n| n > 0) && matches!(per.trim(), "s" | "m" | "h")
    });
    ensure(valid, span, || {
        format!("`{text}` is not a rate limit; write e.g. \"10/s\", \"100/m\" or \"1000/h\"")
    })
}
