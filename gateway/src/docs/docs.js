// Renders /api/openapi.json: operations grouped by tag, with parameters, request body,
// responses and their schemas. No dependencies, no network beyond this origin.
"use strict";

const METHODS = ["get", "post", "put", "patch", "delete"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function resolve(doc, schema, seen = new Set()) {
  if (!schema || typeof schema !== "object") return schema;
  if (Array.isArray(schema)) return schema.map((s) => resolve(doc, s, seen));
  if (typeof schema.$ref === "string") {
    const name = schema.$ref.split("/").pop();
    if (seen.has(name)) return { $ref: schema.$ref };
    const target = doc.components?.schemas?.[name];
    return resolve(doc, target, new Set([...seen, name]));
  }
  const out = {};
  for (const [k, v] of Object.entries(schema)) out[k] = resolve(doc, v, seen);
  return out;
}

function constraints(schema) {
  if (!schema) return "";
  const keys = ["type", "format", "pattern", "minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems", "enum", "default"];
  return keys.filter((k) => schema[k] !== undefined).map((k) => `${k}: ${JSON.stringify(schema[k])}`).join(", ");
}

function schemaBlock(doc, schema) {
  return el("pre", {}, JSON.stringify(resolve(doc, schema), null, 2));
}

function operation(doc, path, method, op) {
  const summary = el("summary", {},
    el("span", { class: `method ${method}` }, method),
    el("span", { class: "path" }, path),
    el("span", {}, op.summary || ""));
  if (op.security && op.security.length) summary.append(el("span", { class: "lock" }, `token: ${op["x-required-role"] || "user"}`));
  if (op["x-compatibility"]) summary.append(el("span", { class: "compat" }, "compatibility"));
  const body = el("div", { class: "body" });
  if (op.description) body.append(el("p", {}, op.description));
  if (op.parameters?.length) {
    const table = el("table", {}, el("tr", {}, el("th", {}, "Parameter"), el("th", {}, "In"), el("th", {}, "Required"), el("th", {}, "Schema"), el("th", {}, "Description")));
    for (const p of op.parameters) {
      table.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in), el("td", {}, p.required ? "yes" : "no"),
        el("td", {}, el("code", {}, constraints(resolve(doc, p.schema)))), el("td", {}, p.description || "")));
    }
    body.append(el("h4", {}, "Parameters"), table);
  }
  const request = op.requestBody?.content;
  if (request) {
    for (const [media, content] of Object.entries(request)) {
      body.append(el("h4", {}, `Request body (${media})${op.requestBody.required ? ", required" : ""}`), schemaBlock(doc, content.schema));
    }
  }
  body.append(el("h4", {}, "Responses"));
  for (const [status, response] of Object.entries(op.responses || {})) {
    const row = el("div", {}, el("strong", {}, status), " ", el("span", { class: "muted" }, response.description || ""));
    body.append(row);
    const headers = Object.keys(response.headers || {});
    if (headers.length) body.append(el("div", { class: "muted" }, `Headers: ${headers.join(", ")}`));
    for (const [media, content] of Object.entries(response.content || {})) {
      if (content.schema) body.append(el("div", { class: "muted" }, media), schemaBlock(doc, content.schema));
    }
  }
  const details = el("details", { class: "op", "data-search": `${method} ${path} ${op.operationId || ""} ${(op.tags || []).join(" ")}`.toLowerCase() }, summary, body);
  return details;
}

function render(doc) {
  document.getElementById("title").textContent = `${doc.info?.title || "API"} ${doc.info?.version || ""}`;
  const main = document.getElementById("content");
  main.replaceChildren();
  if (doc.info?.description) for (const para of doc.info.description.split("\n\n")) main.append(el("p", {}, para));
  const groups = new Map((doc.tags || []).map((t) => [t.name, { tag: t, ops: [] }]));
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || "other";
      if (!groups.has(tag)) groups.set(tag, { tag: { name: tag }, ops: [] });
      groups.get(tag).ops.push(operation(doc, path, method, op));
    }
  }
  for (const { tag, ops } of groups.values()) {
    if (!ops.length) continue;
    const section = el("section", {}, el("h2", {}, tag.name));
    if (tag.description) section.append(el("p", { class: "muted" }, tag.description));
    section.append(...ops);
    main.append(section);
  }
}

function filter(text) {
  const needle = text.trim().toLowerCase();
  for (const op of document.querySelectorAll("details.op")) {
    op.hidden = needle !== "" && !op.dataset.search.includes(needle);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("filter").addEventListener("input", (e) => filter(e.target.value));
  try {
    const response = await fetch("/api/openapi.json", { headers: { accept: "application/json" } });
    const doc = await response.json();
    if (!response.ok) throw new Error(doc.error?.message || `HTTP ${response.status}`);
    render(doc);
  } catch (err) {
    document.getElementById("content").replaceChildren(el("p", {}, `Cannot load the API document: ${err.message}`));
  }
});
