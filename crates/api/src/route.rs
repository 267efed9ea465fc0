//! Route tables: each server lists its routes once — method, path, the role a caller needs, a
//! summary, and the request, query and response types. The server's router is built from the
//! table (an exhaustive `match` on the route's id gives each one its handler, so a route without
//! a handler does not compile), its role check reads the route's role, and [`openapi`] writes the
//! OpenAPI 3.1 document from it.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

/// HTTP methods the servers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    /// The HTTP method token (`GET`, `POST`, …).
    pub fn http(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }

    /// The OpenAPI operation key (`get`, `post`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Delete => "delete",
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Anyone who reaches the listener (identity, the CA certificate, registration).
    Anyone,
    /// A daemon's local status listener: whoever can reach its (loopback) address.
    Local,
    /// The daemon's control token (`Authorization: Bearer`): a secret the daemon keeps in a
    /// file only its own user can read (`control_token_file` in its status), so the ferry CLI
    /// running as that user on the same host may call it and other local users may not.
    Control,
    /// A signature by the coordinator key of the member's replication group (the configuration
    /// server gives the private key to the coordinator, the public key to the members): group
    /// prepare/commit/abort come only from the coordinator.
    Coordinator,
    /// A registered component's token (heartbeats, its own settings).
    Component,
    /// Sees everything, changes nothing.
    Reader,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Anyone => "none",
            Role::Local => "local",
            Role::Control => "control",
            Role::Coordinator => "coordinator",
            Role::Component => "component",
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// A token role by name (`reader`, `operator`, `admin`, `component`).
    pub fn parse_token_role(s: &str) -> Option<Role> {
        match s {
            "component" => Some(Role::Component),
            "reader" => Some(Role::Reader),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Whether a token of role `self` may call a route that needs `need`: component tokens only
    /// reach component routes; human roles are ordered reader < operator < admin, and any of them
    /// may also call component routes.
    pub fn allows(self, need: Role) -> bool {
        match need {
            Role::Anyone | Role::Local | Role::Component => true,
            // A status listener's own secrets: no configuration-server token grants them.
            Role::Control | Role::Coordinator => false,
            _ => !matches!(self, Role::Component | Role::Control | Role::Coordinator) && self >= need,
        }
    }
}

/// A schema writer for a type (a function pointer, so tables can be `const`).
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T`, registered in the document's components.
pub fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// One route of a server.
#[derive(Debug, Clone, Copy)]
pub struct Route<Id: 'static> {
    pub id: Id,
    pub method: Method,
    /// axum path syntax (`/machines/{m}/points`), which is also OpenAPI's.
    pub path: &'static str,
    pub role: Role,
    pub summary: &'static str,
    /// JSON body, if the route takes one.
    pub request: Option<SchemaFn>,
    /// Query parameters (an object schema), if any.
    pub query: Option<SchemaFn>,
    /// The success body.
    pub response: SchemaFn,
    /// The success status (200, 201 or 202).
    pub status: u16,
}

/// A route with no body, no query, answering 200 with `T`.
pub const fn get<Id: Copy, T: JsonSchema>(id: Id, path: &'static str, role: Role, summary: &'static str) -> Route<Id> {
    Route {
        id,
        method: Method::Get,
        path,
        role,
        summary,
        request: None,
        query: None,
        response: schema::<T>,
        status: 200,
    }
}

impl<Id: Copy> Route<Id> {
    pub const fn new<Req: JsonSchema, Resp: JsonSchema>(
        id: Id,
        method: Method,
        path: &'static str,
        role: Role,
        summary: &'static str,
    ) -> Route<Id> {
        Route {
            id,
            method,
            path,
            role,
            summary,
            request: Some(schema::<Req>),
            query: None,
            response: schema::<Resp>,
            status: 200,
        }
    }
    /// The same route without a request body.
    pub const fn no_body(mut self) -> Route<Id> {
        self.request = None;
        self
    }
    pub const fn with_query<Q: JsonSchema>(mut self) -> Route<Id> {
        self.query = Some(schema::<Q>);
        self
    }
    pub const fn answers(mut self, status: u16) -> Route<Id> {
        self.status = status;
        self
    }
}

/// The route of `table` matching `method` and a concrete `path` (segments in braces match any
/// one segment).
pub fn find<Id: Copy>(table: &'static [Route<Id>], method: Method, path: &str) -> Option<&'static Route<Id>> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    table.iter().find(|r| {
        let want: Vec<&str> = r.path.split('/').collect();
        r.method == method
            && want.len() == segs.len()
            && want.iter().zip(&segs).all(|(w, s)| (w.starts_with('{') && w.ends_with('}') && !s.is_empty()) || w == s)
    })
}

/// Document-wide facts for [`openapi`].
pub struct DocInfo {
    pub title: &'static str,
    /// `true` when routes other than `Anyone`/`Local` take a bearer token.
    pub bearer_tokens: bool,
}

/// The OpenAPI 3.1 document of a route table: paths with their parameters, bodies and responses,
/// the error body for every failure, and each route's role as `x-ferry-role`.
pub fn openapi<Id: Copy>(info: &DocInfo, table: &[Route<Id>]) -> Value {
    let mut gen = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "#/components/schemas/".into())
        .into_generator();
    let error = gen.subschema_for::<crate::ErrorBody>();
    let mut paths = Map::new();
    for r in table {
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if let Some(q) = r.query {
            let q = q(&mut gen);
            let q = resolve(&gen, q.to_value());
            let required: Vec<String> = q["required"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            if let Some(props) = q["properties"].as_object() {
                for (name, s) in props {
                    params.push(json!({"name": name, "in": "query", "required": required.contains(name), "schema": s}));
                }
            }
        }
        let mut op = Map::new();
        op.insert("operationId".into(), json!(operation_id(r.method, r.path)));
        op.insert("summary".into(), json!(r.summary));
        op.insert("x-ferry-role".into(), json!(r.role.as_str()));
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = r.request {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": req(&mut gen).to_value()}}}),
            );
        }
        let ok = (r.response)(&mut gen).to_value();
        op.insert(
            "responses".into(),
            json!({
                r.status.to_string(): {"description": "Success", "content": {"application/json": {"schema": ok}}},
                "default": {"description": "Error: code, name, message and remedy", "content": {"application/json": {"schema": error.clone().to_value()}}},
            }),
        );
        if !matches!(r.role, crate::Role::Anyone | crate::Role::Local) {
            op.insert("security".into(), json!([{"token": []}]));
        }
        entry[r.method.as_str()] = Value::Object(op);
    }
    let schemas: Map<String, Value> = gen.take_definitions(true).into_iter().collect();
    let mut components = json!({ "schemas": schemas });
    if info.bearer_tokens || table.iter().any(|r| !matches!(r.role, crate::Role::Anyone | crate::Role::Local)) {
        components["securitySchemes"] = json!({"token": {"type": "http", "scheme": "bearer"}});
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": info.title, "version": "1"},
        "paths": paths,
        "components": components,
    })
}

/// A `$ref` to a definition replaced by the definition (query parameters need the properties).
fn resolve(gen: &SchemaGenerator, v: Value) -> Value {
    let Some(r) = v.get("$ref").and_then(|r| r.as_str()) else { return v };
    let name = r.rsplit('/').next().unwrap_or_default();
    gen.definitions().get(name).cloned().unwrap_or(v)
}

fn operation_id(method: Method, path: &str) -> String {
    let mut id = method.as_str().to_owned();
    for seg in path.split('/').filter(|s| !s.is_empty() && *s != "api" && *s != "v1") {
        let seg = seg.trim_start_matches('{').trim_end_matches('}');
        id.push('_');
        id.push_str(&seg.replace(['-', '.'], "_"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug)]
    enum Id {
        A,
        B,
    }

    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Q {
        from: String,
        to: Option<String>,
    }

    const T: &[Route<Id>] = &[
        get::<Id, crate::Event>(Id::A, "/m/{m}/points", Role::Local, "points").with_query::<Q>(),
        Route::new::<crate::Event, crate::Event>(Id::B, Method::Post, "/m/{m}/points", Role::Operator, "take"),
    ];

    #[test]
    fn finds_routes_by_method_and_concrete_path() {
        assert!(matches!(find(T, Method::Get, "/m/vm1/points").map(|r| r.id), Some(Id::A)));
        assert!(matches!(find(T, Method::Post, "/m/vm1/points").map(|r| r.id), Some(Id::B)));
        assert!(find(T, Method::Delete, "/m/vm1/points").is_none());
        assert!(find(T, Method::Get, "/m//points").is_none());
        assert!(find(T, Method::Get, "/m/vm1/points/x").is_none());
    }

    #[test]
    fn document_has_parameters_bodies_and_schemas() {
        let d = openapi(&DocInfo { title: "t", bearer_tokens: true }, T);
        let get = &d["paths"]["/m/{m}/points"]["get"];
        let names: Vec<_> = get["parameters"].as_array().into_iter().flatten().map(|p| p["name"].clone()).collect();
        assert_eq!(names, vec![json!("m"), json!("from"), json!("to")]);
        assert_eq!(get["parameters"][1]["required"], true);
        assert_eq!(get["parameters"][2]["required"], false);
        assert!(get.get("security").is_none(), "local routes take no token");
        let post = &d["paths"]["/m/{m}/points"]["post"];
        assert_eq!(post["security"], json!([{"token": []}]));
        assert_eq!(post["requestBody"]["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Event");
        assert!(d["components"]["schemas"]["Event"]["properties"]["time_ms"].is_object());
        assert!(d["components"]["schemas"]["ErrorBody"].is_object());
    }

    #[test]
    fn component_tokens_only_reach_component_routes() {
        assert!(Role::Component.allows(Role::Component));
        assert!(!Role::Component.allows(Role::Reader));
        assert!(Role::Reader.allows(Role::Component));
        assert!(!Role::Reader.allows(Role::Operator));
        assert!(Role::Admin.allows(Role::Operator));
    }
}
