//! The OpenAPI 3.1 document served at `/api/openapi.json`, generated from the
//! route table and the protobuf descriptors: paths come from
//! [`crate::api::routes`], schemas from the `beseda.v1` messages in their
//! canonical JSON form. Nothing here is written by hand, so the document
//! cannot drift from the code.

use beseda_core::ErrorCode;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use crate::api::{Access, routes};

const PACKAGE_PREFIX: &str = ".beseda.v1.";

fn schema_ref(type_name: &str) -> Value {
    match type_name {
        ".google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        ".google.protobuf.Struct" => json!({"type": "object"}),
        other => json!({"$ref": format!("#/components/schemas/{}", other.trim_start_matches(PACKAGE_PREFIX))}),
    }
}

fn field_schema(field: &prost_types::FieldDescriptorProto) -> Value {
    let scalar = match field.r#type() {
        Type::String => json!({"type": "string"}),
        Type::Bool => json!({"type": "boolean"}),
        Type::Bytes => json!({"type": "string", "format": "byte", "description": "base64"}),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Type::Uint32 | Type::Fixed32 => json!({"type": "integer", "format": "int32", "minimum": 0}),
        Type::Int64 | Type::Sint64 | Type::Sfixed64 | Type::Uint64 | Type::Fixed64 => {
            json!({"type": "string", "format": "int64", "description": "64-bit integers are strings in canonical JSON"})
        }
        Type::Double | Type::Float => json!({"type": "number"}),
        Type::Enum | Type::Message | Type::Group => schema_ref(field.type_name()),
    };
    if field.label() == Label::Repeated { json!({"type": "array", "items": scalar}) } else { scalar }
}

/// A `map<K, V>` field: in canonical JSON an object with string keys.
fn map_schema(message: &DescriptorProto, field: &prost_types::FieldDescriptorProto) -> Option<Value> {
    if field.label() != Label::Repeated {
        return None;
    }
    let entry_name = field.type_name().rsplit('.').next()?;
    let entry = message.nested_type.iter().find(|nested| {
        nested.name() == entry_name && nested.options.as_ref().is_some_and(|options| options.map_entry())
    })?;
    let value = entry.field.iter().find(|entry_field| entry_field.number() == 2)?;
    Some(json!({"type": "object", "additionalProperties": field_schema(value)}))
}

fn message_schema(message: &DescriptorProto) -> Value {
    let mut properties = Map::new();
    for field in &message.field {
        let schema = map_schema(message, field).unwrap_or_else(|| field_schema(field));
        properties.insert(field.json_name().to_owned(), schema);
    }
    json!({"type": "object", "properties": properties, "additionalProperties": false})
}

fn enum_schema(enumeration: &EnumDescriptorProto) -> Value {
    let values: Vec<Value> = enumeration.value.iter().map(|value| Value::String(value.name().to_owned())).collect();
    json!({"type": "string", "enum": values})
}

fn collect_schemas(
    prefix: &str,
    messages: &[DescriptorProto],
    enums: &[EnumDescriptorProto],
    schemas: &mut Map<String, Value>,
) {
    for enumeration in enums {
        schemas.insert(format!("{prefix}{}", enumeration.name()), enum_schema(enumeration));
    }
    for message in messages {
        let name = format!("{prefix}{}", message.name());
        schemas.insert(name.clone(), message_schema(message));
        collect_schemas(&format!("{name}."), &message.nested_type, &message.enum_type, schemas);
    }
}

/// Builds the document.
pub fn document() -> Value {
    let descriptors = FileDescriptorSet::decode(beseda_proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
    let mut schemas = Map::new();
    for file in descriptors.file.iter().filter(|file| file.package() == "beseda.v1") {
        collect_schemas("", &file.message_type, &file.enum_type, &mut schemas);
    }
    let error_codes: Vec<Value> = ErrorCode::ALL.iter().map(|code| Value::String(code.as_str().to_owned())).collect();
    schemas.insert(
        "ErrorBody".into(),
        json!({
            "type": "object",
            "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string", "enum": error_codes},
                "message": {"type": "string"},
                "field": {"type": "string"}
            }, "required": ["code", "message"]}}
        }),
    );
    let mut paths = Map::new();
    for route in routes() {
        let mut parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{').and_then(|segment| segment.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        parameters.extend(
            route
                .query_parameters
                .iter()
                .map(|name| json!({"name": name, "in": "query", "required": false, "schema": {"type": "string"}})),
        );
        let mut operation = json!({
            "operationId": route.operation,
            "summary": route.summary,
            "description": if route.one_c == crate::api::NO_1C_METHOD {
                "1C:Enterprise: no counterpart.".to_owned()
            } else {
                format!("1C:Enterprise: {}", route.one_c)
            },
            "parameters": parameters,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": schema_ref(&format!("{PACKAGE_PREFIX}{}", route.response_message))}}},
                "default": {"description": "A typed error; see docs/errors.md", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            }
        });
        if let Some(request) = route.request_message {
            operation["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": schema_ref(&format!("{PACKAGE_PREFIX}{request}"))}}
            });
        }
        operation["security"] = match route.access {
            Access::Public => json!([]),
            Access::Optional => json!([{}, {"userToken": []}, {"application": []}]),
            Access::Required => json!([{"userToken": []}, {"application": []}]),
        };
        let entry = paths.entry(route.path.to_owned()).or_insert_with(|| json!({}));
        entry[route.method.as_str().to_lowercase()] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Beseda public API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "REST/JSON API for application servers. Bodies use the canonical proto3 JSON mapping of the beseda.v1 messages."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "userToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (HS256, signed with the application key)"},
                "application": {"type": "http", "scheme": "basic", "description": "application id as user name, application key as password"}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_every_referenced_schema_is_in_the_document() {
        let document = document();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        for route in routes() {
            let operation = &document["paths"][route.path][route.method.as_str().to_lowercase()];
            assert_eq!(operation["operationId"], route.operation);
            assert!(schemas.contains_key(route.response_message), "missing schema {}", route.response_message);
            if let Some(request) = route.request_message {
                assert!(schemas.contains_key(request), "missing schema {request}");
            }
        }
        let text = document.to_string();
        for reference in text.split("#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling reference {name}");
        }
        assert_eq!(schemas["Conversation"]["properties"]["memberIds"]["type"], "array");
    }
}
