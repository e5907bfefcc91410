// The console's only script: follows a running action's events (server-sent events) on its
// page, from the lines the page was rendered with (a reconnect resumes after the last line's
// id). Lines are added as text, never as markup.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const list = document.getElementById("events");
  const outcome = document.getElementById("outcome");
  if (!list || !outcome || outcome.dataset.state !== "running") {
    return;
  }
  const stream = new EventSource(list.dataset.stream + "?from=" + Number(list.dataset.count || 0));
  stream.addEventListener("line", (message) => {
    const event = JSON.parse(message.data);
    const item = document.createElement("li");
    item.className = event.event;
    item.textContent = event.line;
    list.appendChild(item);
  });
  stream.addEventListener("end", (message) => {
    const ending = JSON.parse(message.data);
    outcome.textContent = ending.ok ? "succeeded" : "failed: " + ending.error;
    outcome.dataset.state = ending.ok ? "ok" : "failed";
    stream.close();
  });
});
