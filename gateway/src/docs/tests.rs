use serde_json::{Map, json};

use super::*;
use crate::policy::routes::{RouteTable, TableFile};

fn table() -> (RouteTable, Vec<String>) {
    let file: TableFile = serde_yaml::from_str(crate::policy::routes::DEFAULT_TABLE).unwrap();
    let mut names: Vec<String> = file.upstreams.keys().cloned().collect();
    names.sort();
    (RouteTable::compile(&file.routes, &names).unwrap(), names)
}

fn service(paths: &[(&str, &str, &str)]) -> Value {
    let mut doc = json!({"openapi": "3.1.0", "paths": {}, "components": {"schemas": {}}});
    for (path, method, id) in paths {
        let status = if *method == "post" { "201" } else { "200" };
        doc["paths"][*path][*method] =
            json!({"operationId": id, "responses": {status: {"description": "ok"}}});
    }
    doc
}

#[test]
fn paths_are_exposed_as_the_table_routes_them() {
    let (table, names) = table();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let docs: Vec<Value> = names
        .iter()
        .map(|n| match *n {
            "product" => service(&[
                ("/products", "get", "list_products"),
                ("/products/{id}", "get", "get_product"),
                ("/products", "post", "create_product"),
                ("/reservations", "post", "reserve"),
            ]),
            "user" => service(&[
                ("/users", "post", "register"),
                ("/auth/login", "post", "login"),
            ]),
            _ => service(&[]),
        })
        .collect();
    let doc = merge(&table, &names, &docs);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/api/v1/products/{id}"));
    assert!(paths.contains_key("/api/products"));
    assert!(!paths.contains_key("/api/product"), "no such upstream path");
    assert!(
        !paths.keys().any(|p| p.contains("reservations")),
        "internal"
    );
    assert_eq!(
        paths["/api/products"]["get"]["operationId"],
        "list_products_seed"
    );
    assert_eq!(paths["/api/products"]["get"]["x-compatibility"], true);
    assert_eq!(
        paths["/api/v1/products"]["get"]["operationId"],
        "list_products"
    );
    assert!(paths["/api/v1/products"]["get"].get("security").is_none());
    let create = &paths["/api/v1/products"]["post"];
    assert_eq!(create["x-required-role"], "admin");
    assert!(
        create["responses"]["401"]["headers"]
            .get("WWW-Authenticate")
            .is_some()
    );
    assert!(create["responses"]["403"].is_object());
    assert_eq!(
        create["responses"]["201"]["links"]["read"]["operationId"],
        "get_product"
    );
    assert!(
        paths["/api/v1/auth/login"]["post"]
            .get("security")
            .is_none()
    );
    assert!(paths.contains_key(DOCUMENT));
}

#[test]
fn clashing_schemas_are_renamed() {
    let mut into = Map::new();
    into.insert("Item".into(), json!({"type": "string"}));
    let doc = json!({"components": {"schemas": {"Item": {"type": "integer"}, "Box": {"$ref": "#/components/schemas/Item"}}}});
    let renames = merge_schemas(&mut into, "order", &doc);
    assert_eq!(renames, vec![("Item".to_owned(), "order_Item".to_owned())]);
    assert_eq!(into["order_Item"], json!({"type": "integer"}));
    assert_eq!(into["Box"]["$ref"], "#/components/schemas/order_Item");
}
