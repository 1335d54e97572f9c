//! Every file in `config/` is a valid configuration (the reference file documents every key,
//! so a key renamed in code without the reference following fails here).

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = zhian_gateway::config::load_with_env(&path, true, Some(Default::default()))
                .unwrap_or_else(|p| panic!("{}: {:?}", path.display(), p));
            assert!(!cfg.gateway.id.is_empty());
            n += 1;
        }
    }
    assert!(n >= 1, "no config files found in {}", dir.display());
}

#[test]
fn reference_config_has_modbus_examples() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let cfg = zhian_gateway::config::load_with_env(&path, true, Some(Default::default())).unwrap();
    let kinds: Vec<_> = cfg
        .modbus
        .devices
        .iter()
        .map(|d| (d.name.as_str(), d.tcp.is_some()))
        .collect();
    assert!(kinds.contains(&("gate-east", true)), "{kinds:?}");
    assert!(
        kinds.iter().filter(|(_, tcp)| !tcp).count() >= 2,
        "{kinds:?}"
    );
}

#[cfg(feature = "district")]
#[test]
fn the_district_example_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/district/district.toml");
    assert!(zhian_gateway::district::config::is_district_config(&path));
    let cfg = zhian_gateway::district::config::load(&path).unwrap_or_else(|p| panic!("{p:?}"));
    assert_eq!(cfg.filter(), "$share/zhian-district/zhian/district/+/#");
}
