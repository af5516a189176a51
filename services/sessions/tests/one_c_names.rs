//! The "1C method" column must use only names that exist in 1C:Enterprise:
//! a 1C developer looks an operation up by the method name they know, and an
//! invented name would send them nowhere. The reference list is
//! `docs/1c-method-names.txt`, extracted from chapter 29 of the 1C developer
//! guide (the file says how).

use std::collections::{BTreeMap, HashSet};

use beseda_sessions::api::{NO_1C_METHOD, routes};

const NAMES: &str = include_str!("../../../docs/1c-method-names.txt");
const API_DOC: &str = include_str!("../../../docs/api.md");

fn known_names() -> HashSet<&'static str> {
    NAMES.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).collect()
}

/// The names of a column cell that are not in the list. A cell is
/// `NO_1C_METHOD` or names joined by ` / ` or ` + `; `Type.Method` is checked
/// part by part, since the guide names the type and the method separately
/// ("метод Записать() объекта ОбсуждениеСистемыВзаимодействия").
fn unknown_names(cell: &str, known: &HashSet<&str>) -> Vec<String> {
    if cell == NO_1C_METHOD {
        return Vec::new();
    }
    cell.split(" / ")
        .flat_map(|alternative| alternative.split(" + "))
        .filter(|name| name.is_empty() || name.split('.').any(|part| !known.contains(part)))
        .map(|name| format!("`{name}`"))
        .collect()
}

/// Operation → 1C column of the route table in docs/api.md.
fn documented_column() -> BTreeMap<String, String> {
    let table = API_DOC.split("## Routes").nth(1).expect("docs/api.md has a Routes section");
    table
        .lines()
        .skip_while(|line| !line.starts_with("| Method |"))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            (cells[2].to_owned(), cells[3].to_owned())
        })
        .collect()
}

#[test]
fn the_reference_list_is_the_guides_names() {
    let known = known_names();
    // Spot checks that the list is the extracted one and not an empty or
    // truncated file, which would make the other tests pass vacuously.
    for name in [
        "ВыполнитьРегистрациюИнформационнойБазы",
        "ОтправитьВременныйКод",
        "ДобавитьВАдминистраторыАбонента",
        "ОбсуждениеСистемыВзаимодействия",
        "Записать",
    ] {
        assert!(known.contains(name), "{name} is missing from docs/1c-method-names.txt");
    }
    assert!(known.len() > 100, "docs/1c-method-names.txt has only {} names", known.len());
    // Names the route table used before they were checked; none is in the guide.
    for invented in ["ЗарегистрироватьПриложение", "ОтменитьРегистрациюПриложения", "ПолучитьВерсиюСервера"]
    {
        assert!(!known.contains(invented), "{invented} is not a name from the guide");
    }
}

#[test]
fn the_code_table_uses_only_names_from_the_guide() {
    let known = known_names();
    let unknown: Vec<String> = routes()
        .iter()
        .filter_map(|route| {
            let names = unknown_names(route.one_c, &known);
            (!names.is_empty()).then(|| format!("{}: {}", route.operation, names.join(", ")))
        })
        .collect();
    assert!(unknown.is_empty(), "not 1C method names (see docs/1c-method-names.txt):\n{}", unknown.join("\n"));
}

#[test]
fn docs_api_md_shows_the_code_tables_names_for_every_route() {
    let known = known_names();
    let documented = documented_column();
    let mut problems = Vec::new();
    for route in routes() {
        match documented.get(route.operation) {
            None => problems.push(format!("{} is missing from the Routes table", route.operation)),
            Some(cell) if cell != route.one_c => {
                problems.push(format!("{}: docs say `{cell}`, code says `{}`", route.operation, route.one_c));
            }
            Some(_) => {}
        }
    }
    for (operation, cell) in &documented {
        let names = unknown_names(cell, &known);
        if !names.is_empty() {
            problems.push(format!("{operation}: {}", names.join(", ")));
        }
    }
    assert!(problems.is_empty(), "docs/api.md Routes table:\n{}", problems.join("\n"));
}

#[test]
fn operations_named_in_the_issue_carry_their_1c_names() {
    let one_c = |operation: &str| {
        routes().iter().find(|route| route.operation == operation).map(|route| route.one_c).unwrap_or_default()
    };
    assert_eq!(one_c("CompleteRegistration"), "ВыполнитьРегистрациюИнформационнойБазы");
    assert_eq!(one_c("Unregister"), "ОтменитьРегистрациюИнформационнойБазы");
    assert_eq!(one_c("RequestTemporaryCode"), "ОтправитьВременныйКод");
    assert_eq!(one_c("ReissueAdministrationKey"), "ПолучитьНовыйКлючАдминистрирования");
    assert_eq!(one_c("AddSubscriberAdministrator"), "ДобавитьВАдминистраторыАбонента");
    assert_eq!(one_c("RemoveSubscriberAdministrator"), "ИсключитьИзАдминистраторовАбонента");
    assert_eq!(one_c("GetDoNotDisturb"), "ПолучитьОтображениеОповещенийОбсуждения");
    assert_eq!(one_c("SetDoNotDisturb"), "УстановитьОтображениеОповещенийОбсуждения");
    assert_eq!(one_c("GetServerInfo"), "ВерсияСервера");
    assert_eq!(one_c("CreateEventSubscription"), NO_1C_METHOD);
}
