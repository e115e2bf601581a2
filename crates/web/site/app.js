// foobar guestbook: plain fetch, no framework. User text is only ever set with
// textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function setText(id, value) {
  $(id).textContent = value;
}

function showServer(response) {
  const host = response.headers.get("X-Served-By");
  if (host) setText("served-by", host);
}

async function getJson(url, options) {
  const response = await fetch(url, options);
  showServer(response);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const reason = body && body.error ? body.error : response.status + " " + response.statusText;
    throw new Error(reason);
  }
  return body;
}

function formatTime(rfc3339) {
  const date = new Date(rfc3339);
  return isNaN(date) ? rfc3339 : date.toLocaleString();
}

function renderMessages(messages) {
  const list = $("messages");
  list.replaceChildren();
  for (const m of messages) {
    const item = document.createElement("li");
    const head = document.createElement("div");
    head.className = "meta";
    const author = document.createElement("strong");
    author.textContent = m.author;
    const time = document.createElement("time");
    time.dateTime = m.created_at;
    time.textContent = formatTime(m.created_at);
    head.append(author, " · ", time);
    const text = document.createElement("p");
    text.textContent = m.text;
    item.append(head, text);
    list.append(item);
  }
  $("empty").hidden = messages.length > 0;
}

async function loadMessages() {
  try {
    const body = await getJson("/api/messages");
    renderMessages(body.messages);
  } catch (e) {
    setText("status", "Could not load messages: " + e.message);
  }
}

async function loadWhoami() {
  try {
    const body = await getJson("/api/whoami");
    setText("served-by", body.served_by);
    setText("db-engine", body.db.engine);
    setText("db-write", body.db.write_node);
    setText("db-read", body.db.read_node);
    setText("db-lag", body.db.lag_seconds == null ? "n/a" : body.db.lag_seconds.toFixed(1) + " s");
  } catch (e) {
    setText("db-engine", "unavailable (" + e.message + ")");
  }
}

async function sign(event) {
  event.preventDefault();
  const form = event.target;
  const button = form.querySelector("button");
  button.disabled = true;
  setText("status", "Signing…");
  try {
    await getJson("/api/messages", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ author: $("author").value, text: $("text").value }),
    });
    $("text").value = "";
    setText("status", "Thanks!");
    await loadMessages();
  } catch (e) {
    setText("status", e.message);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign").addEventListener("submit", sign);
  $("refresh").addEventListener("click", () => {
    loadWhoami();
    loadMessages();
  });
  loadWhoami();
  loadMessages();
});
