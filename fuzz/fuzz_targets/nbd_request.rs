//! Feed arbitrary bytes to the NBD request, option-header, client-flag and
//! option-payload parsers. Run with `cargo +nightly fuzz run nbd_request`
//! from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_nbd::proto::fuzz_parsers(data);
});
