//! Policy parsing: any text is a policy file or a list of problems, never a panic; every rule
//! set that parses compiles or is refused with problems.
#![no_main]

use fuke::policy::raw::RawPolicyFile;
use fuke::rules::RuleSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = serde_yaml::from_str::<RawPolicyFile>(text) else {
        return;
    };
    for (name, raw) in &file.rules {
        if let Err(problems) = RuleSet::compile(name, raw) {
            assert!(!problems.is_empty());
        }
    }
});
