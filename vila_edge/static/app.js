// vila-edge live page: newest frame as MJPEG, captions over server-sent events. No dependencies.
(function () {
  "use strict";
  var key = new URLSearchParams(location.search).get("key");
  var q = key ? "?key=" + encodeURIComponent(key) : "";
  var $ = function (id) { return document.getElementById(id); };
  var frame = $("frame"), caption = $("caption"), meta = $("meta"), status = $("status");
  var history = $("history"), lastDone = 0, lastText = "";

  function setStatus(text, cls) { status.textContent = text; status.className = "status " + (cls || ""); }

  frame.addEventListener("load", function () { $("noframe").style.display = "none"; });
  frame.addEventListener("error", function () {
    $("noframe").style.display = "";
    setTimeout(function () { frame.src = "stream.mjpg" + q + (q ? "&" : "?") + "t=" + Date.now(); }, 2000);
  });

  fetch("camera/state" + q).then(function (r) { return r.json(); }).then(function (s) {
    $("prompt").textContent = s.prompt || "";
    $("model").textContent = "model: " + s.model + " · a new caption every " + s.interval + " s after the last";
  }).catch(function () {});

  function show(ev) {
    if (ev.waiting) { caption.textContent = "waiting for the first caption…"; caption.className = "caption pending"; return; }
    if (ev.error) {
      meta.innerHTML = ""; var e = document.createElement("span"); e.className = "error";
      e.textContent = "error: " + ev.error; meta.appendChild(e);
    }
    caption.textContent = ev.text || (ev.done ? "(empty answer)" : "");
    caption.className = ev.done ? "caption" : "caption pending";
    if (ev.done && !ev.error) {
      meta.textContent = "caption #" + ev.id + " of frame " + ev.frame + " · " + ev.seconds + " s · " + ev.finish_reason;
      if (ev.id !== lastDone) {
        if (lastText) {  // the caption this one replaces moves to the list of earlier ones
          var li = document.createElement("li"); li.textContent = lastText; history.insertBefore(li, history.firstChild);
          while (history.children.length > 5) history.removeChild(history.lastChild);
        }
        lastDone = ev.id; lastText = ev.text;
      }
    }
  }

  function connect() {
    var es = new EventSource("captions" + q);
    es.onopen = function () { setStatus("live", "live"); };
    es.onmessage = function (m) { try { show(JSON.parse(m.data)); } catch (err) { /* ignore a bad event */ } };
    es.onerror = function () { setStatus("reconnecting…", "down"); };
  }

  // The MJPEG stream never ends, so the page's load event never fires (as with any MJPEG camera page).
  frame.src = "stream.mjpg" + q;
  connect();
})();
