// The dashboard's one script (served from /ui/assets, so the CSP can forbid inline script):
// a confirmation before a change that cannot be undone. Every page works without it.
"use strict";
document.addEventListener("submit", function (ev) {
  var msg = ev.target.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) {
    ev.preventDefault();
  }
});
