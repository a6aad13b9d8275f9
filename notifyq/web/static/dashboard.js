// notifyq web: live updates over Server-Sent Events, CSRF tokens in forms, confirmations.
// No framework, no build step.  The overview's #live is replaced by each pushed fragment;
// other pages only say that something changed (reloading them is one query, on demand).
(function () {
  "use strict";
  var csrf = (document.querySelector('meta[name="csrf"]') || {}).content || "";
  var body = document.body;
  var status = document.getElementById("status");

  function arm(root) {
    root.querySelectorAll('input[name="csrf"]').forEach(function (input) { input.value = csrf; });
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
      });
    });
  }
  arm(document);

  if (!window.EventSource || !body.dataset.events) { return; }
  var source = new EventSource(body.dataset.events);
  var first = true;
  source.addEventListener("open", function () { status.className = "status on"; });
  source.addEventListener("error", function () { status.className = "status off"; });
  source.addEventListener("overview", function (event) {
    var live = document.getElementById("live");
    if (live && body.dataset.live === "overview") {
      live.innerHTML = event.data;  // rendered and escaped by the server
      arm(live);
    } else if (!first) {
      document.getElementById("stale").hidden = false;
    }
    first = false;
  });
})();
