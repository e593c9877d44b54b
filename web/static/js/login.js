// Log in and sign up, on one page with two tabs. On success the server has set the session
// cookie; we go on to ?next= (a same-site path the server already checked) or the studio.
import { api } from "./api.js";
import { setupChrome } from "./chrome.js";
import { $ } from "./ui.js";

const section = $(".auth");
const tabs = {
  login: { tab: $("#tab-login"), form: $("#form-login") },
  register: { tab: $("#tab-register"), form: $("#form-register") },
};

function select(mode, focus = false) {
  for (const [name, { tab, form }] of Object.entries(tabs)) {
    const on = name === mode;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    form.hidden = !on;
  }
  if (focus) tabs[mode].tab.focus();
  const url = new URL(window.location.href);
  if (mode === "register") url.searchParams.set("mode", "register");
  else url.searchParams.delete("mode");
  window.history.replaceState(null, "", url);
}

for (const [mode, { tab }] of Object.entries(tabs)) {
  tab.addEventListener("click", () => select(mode));
  // arrow keys move between tabs, as the ARIA tabs pattern expects
  tab.addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      event.preventDefault();
      select(mode === "login" ? "register" : "login", true);
    }
  });
}

function destination(registered) {
  const next = section.dataset.next || "/";
  if (registered && next === "/") return "/studio";
  return next;
}

async function submit(form, event) {
  event.preventDefault();
  const error = $(".form-error", form);
  const button = $('button[type="submit"]', form);
  const username = form.elements.username.value.trim();
  const password = form.elements.password.value;
  error.hidden = true;
  if (!username || !password) {
    error.textContent = "Enter a username and a password.";
    error.hidden = false;
    (username ? form.elements.password : form.elements.username).focus();
    return;
  }
  const registering = form.id === "form-register";
  button.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    if (registering) await api.register(username, password);
    else await api.login(username, password);
    window.location.assign(destination(registering));
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
    button.disabled = false;
    form.removeAttribute("aria-busy");
    form.elements.password.focus();
  }
}

for (const { form } of Object.values(tabs)) {
  form.addEventListener("submit", (event) => submit(form, event));
}

setupChrome();
$("#signed-in").hidden = !section.dataset.signedInAs;
const mode = new URLSearchParams(window.location.search).get("mode") === "register" ? "register" : "login";
select(mode);
tabs[mode].form.elements.username.focus();
