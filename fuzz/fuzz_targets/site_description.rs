#![no_main]
//! Feed arbitrary text as a site description (`site.toml`, what the local provider discovers):
//! it must parse or be refused, never panic, and what parses is written and read again unharmed.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(site) = toml::from_str::<ferry_api::inventory::SiteFile>(text) {
        if let Ok(again) = toml::to_string(&site) {
            let _ = toml::from_str::<ferry_api::inventory::SiteFile>(&again);
        }
    }
});
