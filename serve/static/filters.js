// The search page's filter: controls built from what the store's metadata columns hold
// (GET /facets: a choice list with counts for a string column, a range for a number, a toggle for
// a bool), a JSON box for anything the controls cannot say, and the filter said back in words.
//
// The filter sent is the controls' conditions and the JSON box's filter, all required ("and"),
// in the grammar of docs/api.md ("Metadata and filtered search"). Values from the catalogue are
// put in the page as text only, as in search.js.
"use strict";

const Filters = (() => {
  const controls = []; // {field, kind, read(): condition | null}

  function node(tag, className, text) {
    const out = document.createElement(tag);
    if (className) out.className = className;
    if (text !== undefined) out.textContent = String(text);
    return out;
  }

  function count(n) {
    return Number(n).toLocaleString();
  }

  // ---- one control per column -----------------------------------------------------------------
  function choiceList(field, facet) {
    const box = node("fieldset", "facet facet-string");
    box.dataset.field = field;
    box.append(node("legend", "", field));
    const inputs = [];
    for (const [value, rows] of Object.entries(facet.values || {})) {
      const label = node("label", "choice");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = value;
      input.addEventListener("change", changed);
      inputs.push(input);
      label.append(input, node("span", "value", value), node("span", "count", count(rows)));
      box.append(label);
    }
    if (facet.other_values) {
      box.append(node("p", "muted small", `${count(facet.other_values)} more values `
        + `(${count(facet.other_rows)} rows): use the JSON box`));
    }
    const read = () => {
      const chosen = inputs.filter((i) => i.checked).map((i) => i.value);
      if (!chosen.length) return null;
      return chosen.length === 1 ? { field, eq: chosen[0] } : { field, in: chosen };
    };
    return { box, read };
  }

  function range(field, facet) {
    const box = node("fieldset", "facet facet-range");
    box.dataset.field = field;
    box.append(node("legend", "", field));
    const bound = (name, hint) => {
      const input = document.createElement("input");
      input.type = "number";
      input.step = "any";
      input.name = name;
      input.placeholder = hint === null || hint === undefined ? name : String(hint);
      input.setAttribute("aria-label", `${field} ${name}`);
      input.addEventListener("input", changed);
      return input;
    };
    const low = bound("from", facet.min);
    const high = bound("to", facet.max);
    box.append(low, node("span", "muted", "to"), high);
    box.append(node("p", "muted small", `${count(facet.rows)} rows with a value`));
    const read = () => {
      const bounds = {};
      if (low.value !== "" && Number.isFinite(Number(low.value))) bounds.gte = Number(low.value);
      if (high.value !== "" && Number.isFinite(Number(high.value))) bounds.lte = Number(high.value);
      return Object.keys(bounds).length ? { field, range: bounds } : null;
    };
    return { box, read };
  }

  function toggle(field, facet) {
    const box = node("fieldset", "facet facet-bool");
    box.dataset.field = field;
    box.append(node("legend", "", field));
    const select = document.createElement("select");
    select.setAttribute("aria-label", field);
    const values = facet.values || {};
    for (const [value, text] of [["", "any"], ["true", "yes"], ["false", "no"]]) {
      const option = node("option", "", value ? `${text} (${count(values[value] || 0)})` : text);
      option.value = value;
      select.append(option);
    }
    select.addEventListener("change", changed);
    box.append(select);
    const read = () => (select.value === "" ? null : { field, eq: select.value === "true" });
    return { box, read };
  }

  const BUILDERS = { string: choiceList, int: range, float: range, bool: toggle };

  // ---- the filter, and the filter in words ------------------------------------------------------
  function jsonFilter() {
    const text = document.querySelector("#filter").value.trim();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Error(`the filter is not valid JSON: ${e.message}`);
    }
  }

  // The filter to send (undefined: none); throws when the JSON box does not parse.
  function value() {
    const parts = controls.map((c) => c.read()).filter((c) => c !== null);
    const json = jsonFilter();
    if (json !== null) parts.push(json);
    if (!parts.length) return undefined;
    return parts.length === 1 ? parts[0] : { and: parts };
  }

  function literal(v) {
    return typeof v === "string" ? `"${v}"` : String(v);
  }

  const OPS = { gt: ">", gte: "≥", lt: "<", lte: "≤" };

  function words(f) {
    if (!f || typeof f !== "object") return String(f);
    if (Array.isArray(f.and)) return f.and.map(group).join(" and ");
    if (Array.isArray(f.or)) return f.or.map(group).join(" or ");
    if (f.not) return `not ${group(f.not)}`;
    if ("eq" in f) {
      return typeof f.eq === "boolean" ? `${f.field} is ${f.eq ? "yes" : "no"}`
        : `${f.field} is ${literal(f.eq)}`;
    }
    if (Array.isArray(f.in)) return `${f.field} is one of ${f.in.map(literal).join(", ")}`;
    if (f.range && typeof f.range === "object") {
      return Object.entries(f.range).map(([op, v]) => `${f.field} ${OPS[op] || op} ${v}`)
        .join(" and ");
    }
    if ("exists" in f) return `${f.field} ${f.exists ? "is set" : "is not set"}`;
    return JSON.stringify(f);
  }

  function group(f) {
    const text = words(f);
    return f && (Array.isArray(f.and) || Array.isArray(f.or)) ? `(${text})` : text;
  }

  function describe(filter) {
    return filter === undefined ? "" : words(filter);
  }

  function changed() {
    const out = document.querySelector("#filter-words");
    try {
      const text = describe(value());
      out.textContent = text ? `Only images where ${text}.` : "";
    } catch (e) {
      out.textContent = e.message;
    }
  }

  // Build the controls: `facets` is GET /facets's body (null: unavailable, JSON box only).
  function build(facets) {
    const holder = document.querySelector("#filter-controls");
    holder.replaceChildren();
    controls.length = 0;
    const fields = (facets && facets.fields) || {};
    for (const [field, facet] of Object.entries(fields)) {
      const make = BUILDERS[facet.kind];
      if (!make) continue;
      const control = make(field, facet);
      controls.push({ field, kind: facet.kind, read: control.read });
      holder.append(control.box);
    }
    if (facets && facets.partial) {
      holder.append(node("p", "muted small", "counts leave out shards that did not answer"));
    }
    // with no column to offer a control for, the JSON box is the filter: show it open
    document.querySelector("#filter-json").open = controls.length === 0;
    document.querySelector("#filter").addEventListener("input", changed);
    changed();
  }

  return { build, value, describe };
})();
