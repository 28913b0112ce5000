"use strict";
// The search page: reads ?text= / ?url= (and k, safe, dedup) from the address, or the
// form, asks /api/v1/search and shows each result with its thumbnail from this server.

const API = "/api/v1/search";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x) { return x === null || x === undefined ? "-" : x.toFixed(3); }

function card(hit) {
  const box = el("article", { class: "hit", "data-id": String(hit.id) });
  const img = el("img", { alt: hit.caption || "", src: hit.image, loading: "eager" });
  img.addEventListener("load", () => img.setAttribute("data-loaded", String(img.naturalWidth)));
  img.addEventListener("error", () => img.setAttribute("data-loaded", "error"));
  box.append(img, el("p", { class: "caption" }, hit.caption || ""));
  box.append(el("p", { class: "scores" },
    `similarity ${fmt(hit.similarity)} · punsafe ${fmt(hit.punsafe)} · pwatermark ${fmt(hit.pwatermark)}`));
  if (hit.url) box.append(el("a", { href: hit.url, rel: "noreferrer" }, hit.url));
  return box;
}

function show(answer) {
  const main = document.getElementById("results");
  main.replaceChildren(...answer.results.map(card));
  document.getElementById("status").textContent =
    `${answer.results.length} results (${answer.unsafe_removed} unsafe hidden, ` +
    `${answer.duplicates_removed} near-duplicates collapsed)`;
  document.body.setAttribute("data-state", "done");
}

function failed(message) {
  document.getElementById("status").textContent = `error: ${message}`;
  document.body.setAttribute("data-state", "error");
}

async function ask(body) {
  const resp = await fetch(API, { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(body) });
  const answer = await resp.json();
  if (!resp.ok) return failed(answer.detail || resp.statusText);
  show(answer);
}

function options() {
  return { k: Number(document.getElementById("k").value) || 20,
           safe: document.getElementById("safe").checked,
           dedup: document.getElementById("dedup").checked };
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function submit(event) {
  if (event) event.preventDefault();
  const file = document.getElementById("image").files[0];
  const text = document.getElementById("text").value.trim();
  const body = options();
  if (file) body.image_base64 = await readImage(file);
  else if (/^https?:\/\//.test(text)) body.url = text;
  else if (text) body.text = text;
  else return;
  document.body.setAttribute("data-state", "searching");
  ask(body).catch((e) => failed(String(e)));
}

function fromAddress() {
  const params = new URLSearchParams(window.location.search);
  const q = params.get("text") || params.get("url");
  if (params.has("k")) document.getElementById("k").value = params.get("k");
  if (params.get("safe") === "false") document.getElementById("safe").checked = false;
  if (params.get("dedup") === "false") document.getElementById("dedup").checked = false;
  if (q) {
    document.getElementById("text").value = q;
    submit();
  }
}

document.getElementById("query").addEventListener("submit", submit);
fromAddress();
